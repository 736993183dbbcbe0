"""What sliding-window and chunked attention share: a stale range that grows with history.

Both drop old tokens: a query at ``p`` sees sinks ``[0, S)`` plus a span ending at ``p``, so
every later query needs nothing before ``keep_start(h)`` except the sinks::

    tokens  0 ... S-1 | S ............ keep_start(h)-1 | keep_start(h) ... h-1 | h ... c-1
            sinks     |  stale: no future query looks   |  window still needed   |  this step
    blocks  [0, ceil(S/tpb))   [ceil(S/tpb), keep_start(h) // tpb)   [keep_start(h) // tpb, ceil(c/tpb))
            live (sink blocks)  stale range                          live

A block holding any sink token stays; a block is stale only when *all* its tokens are.

The match search: a group needs its sink blocks and the blocks from ``keep_start(L)`` on, so
a missing block ``j`` rules out every history whose needed range still reaches ``j``; those
ranges only move down as the history does, so scanning down from the bound looks at each
block at most once.
"""

from __future__ import annotations

import functools
from typing import ClassVar

from hybridkv.lifecycles.base import LifeCycle, MatchSearch, Present


class Windowed(LifeCycle):
    """Base of kinds whose old blocks go stale (not registered itself)."""

    __slots__ = ()
    deepest_first: ClassVar[bool] = False

    def match_search(self, present: Present, tokens_per_block: int, num_blocks: int) -> MatchSearch:
        return _DownSearch(self, present, tokens_per_block, num_blocks)

    def serves(self, ordinal: int, tokens_per_block: int) -> tuple[int, int | None]:
        """A sink block serves every later match; another one until the needed range has
        moved past it (``first_needed`` is nondecreasing in the history), or none at all
        (``hi < lo``) when it is stale already at ``ordinal + 1`` (a chunk's last block)."""
        if ordinal < self.sink_blocks(tokens_per_block):
            return ordinal + 1, None
        return ordinal + 1, _last_serving(self, ordinal, tokens_per_block)

    def first_needed(self, num_blocks: int, tokens_per_block: int) -> int:
        """First non-sink block needed at history ``num_blocks * tpb`` (never inside the sinks)."""
        return _first_needed(self, num_blocks, tokens_per_block)


@functools.lru_cache(maxsize=1 << 16)
def _first_needed(lc: Windowed, num_blocks: int, tokens_per_block: int) -> int:
    """Memoized: a pure function of small ints, called per probe on the hot path."""
    sinks = min(lc.sink_blocks(tokens_per_block), num_blocks)
    stop = lc.stale_stop(num_blocks * tokens_per_block, tokens_per_block)
    return max(0 if stop is None else int(stop), sinks)


@functools.lru_cache(maxsize=1 << 16)
def _last_serving(lc: Windowed, ordinal: int, tokens_per_block: int) -> int:
    """The highest history ``b`` whose needed range still starts at or before ``ordinal``
    (``ordinal`` itself when none does)."""
    span = lc.span_tokens()
    assert span is not None  # a windowed kind has a span
    if _first_needed(lc, ordinal + 1, tokens_per_block) > ordinal:
        return ordinal
    lo, hi = ordinal + 1, ordinal + 2 + -(-span // tokens_per_block)  # first_needed(hi) > ordinal
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _first_needed(lc, mid, tokens_per_block) <= ordinal else (lo, mid)
    return lo


class _DownSearch(MatchSearch):
    """Blocks ``[ok_from, b)`` of the last ``b`` asked are verified present; ``b`` only
    decreases between calls, so each block is looked up at most once."""

    def __init__(self, lc: Windowed, present: Present, tokens_per_block: int, num_blocks: int) -> None:
        self.lc, self.present, self.tpb = lc, present, tokens_per_block
        self.sinks = lc.sink_blocks(tokens_per_block)
        self.ok_from = num_blocks

    def sink_bound(self, bound: int) -> int:
        """A missing sink block ``s`` rules out every ``b > s``."""
        for s in range(min(self.sinks, bound)):
            if not self.present(s):
                return s
        return bound

    def highest(self, bound: int) -> int:
        b = bound
        while b > 0:
            self.ok_from = min(self.ok_from, b)
            lo = self.lc.first_needed(b, self.tpb)
            j = self.ok_from - 1
            while j >= lo and self.present(j):
                j -= 1
            if j < lo:
                self.ok_from = min(lo, self.ok_from)
                return b
            b = self.ok_from = j  # block j missing: every b' in (j, b] still needs it
        return 0
