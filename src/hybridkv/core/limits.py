"""Upper bounds on the numbers hybridkv accepts, and the one check that states them.

The bounds sit far above any real model or machine (a trillion tokens, an exbibyte, 65,536
layers, a million requests at once). They exist so that a typo such as
``--max-seq-len 99999999999999999999`` is an error that names the setting, the bound and the
fix, instead of an integer overflow in NumPy, an allocation that can never succeed, or a
loop that never ends. Config objects check them in ``__post_init__``; parsers check them
before they build anything sized by the value.
"""

from __future__ import annotations

from hybridkv.core.errors import ConfigError

MAX_TOKENS = 1 << 40
"""Token counts: sequence lengths, windows, chunks, sink tokens, shared prefixes, tokens_per_block."""

MAX_BYTES = 1 << 60
"""Byte sizes: memory quotas, per-token and per-request buffer bytes."""

MAX_LAYERS = 1 << 16
"""Cache-holding layers of one model (a layout entry's ``count``, ``num_hidden_layers``)."""

MAX_REQUESTS = 1 << 20
"""Requests at once: one batch, every constraint together, max_batch_size, a workload."""


def show(value: int) -> str:
    """``value`` for a message; a number too long to read is shortened to its size."""
    if value.bit_length() <= 128:
        return str(value)
    return f"a {value.bit_length()}-bit number"


def _power(bound: int) -> str:
    return f" (2^{bound.bit_length() - 1})" if bound > 1024 and bound & (bound - 1) == 0 else ""


def check_max(what: str, value: int, bound: int, fix: str, unit: str = "", got: str = "") -> None:
    """ConfigError ``'<what> must be <= <bound>, got <value>; <fix>'`` when ``value > bound``
    (``got`` replaces the value where it was too long to read in)."""
    if value > bound:
        raise ConfigError(f"{what} must be <= {bound}{unit}{_power(bound)}, got {got or show(value) + unit}; {fix}")
