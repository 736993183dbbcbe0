"""Which cached blocks a request resuming at history ``L`` needs, per life cycle (pure).

A request that takes its first ``L`` tokens from the cache (``L`` a multiple of tpb) then
behaves exactly like one that computed them and released its stale blocks by the manager's
rule, so a layer group needs precisely the blocks that are live at history ``L``
(``lifecycle.keep_start`` / ``sink_blocks``, the same rule ``stale_range`` applies)::

    blocks    0 .. sinks-1 | sinks ....... lo-1 | lo ........ b-1      (b = L / tpb)
    full      needed       | needed             | needed
    window    needed       | not needed (stale) | needed              lo = keep_start(L) // tpb
    chunked   (no sinks)     not needed         | current chunk
    ssm       only a state snapshot taken at exactly L, stored under block b-1

``L = 0`` needs nothing anywhere, so a match always exists.

``longest_match`` finds the largest ``b`` every group accepts without testing every ``b``
against every group: full groups bound ``b`` by their first missing block (scanning up), and
each other group lowers ``b`` to the highest value it accepts (scanning down from ``b``; a
missing block ``j`` rules out every ``b' > j`` whose needed range still reaches ``j``, and
those ranges only move down as ``b`` does). Groups take turns until none lowers ``b``. Each
group looks at each block at most once, so a probe costs O(blocks) lookups per group, and
on the common path (all cached) only the blocks it needs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import UsageError
from hybridkv.lifecycles.lifecycle import LifeCycle, keep_start, sink_blocks

I64 = npt.NDArray[np.int64]
Present = Callable[[int], bool]
"""Is block ``j`` cached (usably) for this layer group?"""


@functools.lru_cache(maxsize=1 << 16)
def _lo(lc: LifeCycle, num_blocks: int, tokens_per_block: int, sinks: int) -> int:
    """First non-sink block needed at history ``num_blocks * tpb`` (never inside the sinks).
    Memoized: a pure function of small ints, called per probe on the hot path."""
    return max(int(keep_start(lc, num_blocks * tokens_per_block)) // tokens_per_block, min(sinks, num_blocks))


def needed_blocks(lc: LifeCycle, num_blocks: int, tokens_per_block: int) -> I64:
    """Ordinals (ascending) a group of life cycle ``lc`` needs to resume at history
    ``num_blocks * tokens_per_block``; for SSM the snapshot's ordinal ``num_blocks - 1``."""
    if num_blocks == 0:
        return np.zeros(0, np.int64)
    if lc.is_ssm:
        return np.array([num_blocks - 1], np.int64)
    sinks = min(sink_blocks(lc, tokens_per_block), num_blocks)
    lo = _lo(lc, num_blocks, tokens_per_block, sinks)
    if sinks == 0 or lo == sinks:  # one contiguous range
        return np.arange(0 if lo == sinks else lo, num_blocks, dtype=np.int64)
    return np.concatenate([np.arange(sinks, dtype=np.int64), np.arange(lo, num_blocks, dtype=np.int64)])


class _DownSearch:
    """Highest ``b <= bound`` one windowed / chunked / SSM group accepts. Blocks ``[ok_from, b)``
    of the last ``b`` asked are verified present; ``b`` only decreases between calls, so each
    block is looked up at most once."""

    def __init__(self, lc: LifeCycle, present: Present, tokens_per_block: int, num_blocks: int) -> None:
        self.lc, self.present, self.tpb = lc, present, tokens_per_block
        self.sinks = 0 if lc.is_ssm else sink_blocks(lc, tokens_per_block)
        self.ok_from = num_blocks
        self.ssm_accepted = -1  # SSM only: the b last found to have a snapshot at b - 1

    def sink_bound(self, bound: int) -> int:
        """A missing sink block ``s`` rules out every ``b > s``."""
        for s in range(min(self.sinks, bound)):
            if not self.present(s):
                return s
        return bound

    def highest(self, b: int) -> int:
        if self.lc.is_ssm:
            if b != self.ssm_accepted:  # b only decreases: a snapshot below b was never looked at
                while b > 0 and not self.present(b - 1):
                    b -= 1
                self.ssm_accepted = b
            return b
        while b > 0:
            self.ok_from = min(self.ok_from, b)
            lo = _lo(self.lc, b, self.tpb, self.sinks)
            j = self.ok_from - 1
            while j >= lo and self.present(j):
                j -= 1
            if j < lo:
                self.ok_from = min(lo, self.ok_from)
                return b
            b = self.ok_from = j  # block j missing: every b' in (j, b] still needs it
        return 0


def longest_match(life_cycles: Sequence[LifeCycle], present: Sequence[Present], num_blocks: int,
                  tokens_per_block: int) -> int:
    """The largest ``b <= num_blocks`` such that every group accepts history ``b * tpb``
    (``present[g](j)``: is block ``j`` cached for group ``g``); 0 when only the empty prefix."""
    if not life_cycles or len(present) != len(life_cycles):
        raise UsageError(f"longest_match needs one presence test per layer group (>= 1), got "
                         f"{len(present)} for {len(life_cycles)} groups")
    b = num_blocks
    searches = []
    for lc, pres in zip(life_cycles, present, strict=True):
        if lc.is_full:
            b = next((j for j in range(b) if not pres(j)), b)
        else:
            searches.append(_DownSearch(lc, pres, tokens_per_block, num_blocks))
    for s in searches:
        b = s.sink_bound(b)
    lowered = True
    while lowered and b > 0:
        lowered = False
        for s in searches:
            h = s.highest(b)
            lowered, b = lowered or h < b, h
    return b
