"""The exception hierarchy.

Two ways to say no: a False/None return when there is no room *right now* (the caller may
retry), and one of these exceptions for impossible requests, misuse and bugs. Messages carry
the numbers and name the setting to change.
"""

from __future__ import annotations


class HybridKVError(Exception):
    """Base of every error this library raises on purpose."""


class ConfigError(HybridKVError, ValueError):
    """A layout, config file or setting is malformed or contradictory."""


class CapacityError(HybridKVError):
    """The request can never be satisfied with this memory (not merely 'not right now')."""


class UsageError(HybridKVError):
    """An API was called out of order or with arguments that break its contract."""


class InvariantError(HybridKVError, AssertionError):
    """An internal invariant is broken: a bug in hybridkv, never the caller's fault."""
