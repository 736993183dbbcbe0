"""The brute-force reference several test files share: an attention mask, token by token."""

from __future__ import annotations

from hybridkv.lifecycles import LifeCycle


def visible(lc: LifeCycle, p: int, q: int) -> bool:
    """Does a query at position p see the key at position q?"""
    if q > p:
        return False
    if lc.chunk_tokens is not None:
        return q // lc.chunk_tokens == p // lc.chunk_tokens
    if lc.window_tokens is None:
        return True
    return q < lc.sink_tokens or p - q < lc.window_tokens
