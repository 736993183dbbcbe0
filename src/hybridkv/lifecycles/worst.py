"""The worst case of one decoding request: the most live blocks it holds at any position.

Exact, from a handful of positions for any window or length (``decode_positions``).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_TOKENS, check_max, show
from hybridkv.lifecycles.base import IntArray, LifeCycle

MAX_DECODE_POSITIONS = 1 << 21
"""Positions worst_decode_blocks may evaluate. One drop period needs at most
``min(tpb, max_len / tpb) + 2 <= 2^20 + 2``; only several periods with a huge common
period in one pool group can need more."""


def decode_positions(lcs: tuple[LifeCycle, ...], tokens_per_block: int, max_len: int) -> IntArray:
    """Histories ``h < max_len`` at which a decode's summed live blocks over ``lcs`` can peak.

    A block is added only when ``h`` reaches a block start (a multiple of tpb) and stale
    ranges only grow, so no position beats the block start before it. From one block start
    to the next, a kind loses blocks only where it drops a whole span (``drop_period_tokens``:
    a chunked group loses its chunk when the next block start passes a chunk boundary). So
    the peak is at the last block start before ``max_len`` or at a block start just before a
    drop boundary; and as the dropping part repeats every ``lcm(period, tpb)`` tokens while
    the rest never shrinks, only the last such period counts::

        tokens   ... | k*tpb ........ m*chunk ........ (k+1)*tpb | ...
                       ^ candidate: the chunk [.., m*chunk) is still whole here
    """
    last = (max_len - 1) // tokens_per_block  # block index of the last decode position
    periods = sorted({p for lc in lcs if (p := lc.drop_period_tokens()) is not None})
    period = 1  # in blocks
    for c in periods:
        period = math.lcm(period, math.lcm(c, tokens_per_block) // tokens_per_block)
    first = max(0, last - period + 1)
    parts = [np.array([last], np.int64)]
    for c in periods:
        if c <= tokens_per_block:  # every block holds a boundary
            count, lo = last - first + 1, first
        else:  # boundaries m * c in (first * tpb, last * tpb]: the block start before each
            lo, hi = first * tokens_per_block // c + 1, last * tokens_per_block // c
            count = hi - lo + 1
        if sum(len(p) for p in parts) + count > MAX_DECODE_POSITIONS:
            raise ConfigError(f"chunk sizes {periods} share one pool group at tokens_per_block "
                              f"{tokens_per_block}: their pattern repeats only every "
                              f"{show(period * tokens_per_block)} tokens, too many positions to check "
                              f"up to max_seq_len {max_len}; lower --max-seq-len or give the "
                              "chunked layers different slot sizes")
        steps = np.arange(lo, lo + max(count, 0), dtype=np.int64)
        parts.append(steps if c <= tokens_per_block else -(-steps * c // tokens_per_block) - 1)
    return np.concatenate(parts) * tokens_per_block  # repeats are harmless: only the max is taken


@functools.lru_cache(maxsize=4096)
def worst_decode_blocks(lcs: tuple[LifeCycle, ...], tokens_per_block: int, max_len: int) -> int:
    """max over histories h < max_len of sum over ``lcs`` of live_blocks(h + 1, h).

    The worst case of one decoding request whose layer groups ``lcs`` share a pool group.
    ``max_len < 1`` means no tokens: 0.
    """
    if max_len < 1:
        return 0
    check_max("max_len", max_len, MAX_TOKENS, "lower --max-seq-len")
    h = decode_positions(lcs, tokens_per_block, max_len)
    total = np.zeros_like(h)
    for lc in lcs:
        total += lc.live_blocks(h + 1, h, tokens_per_block)
    return int(total.max())
