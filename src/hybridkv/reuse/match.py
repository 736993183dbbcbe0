"""Which cached blocks a request resuming at history ``L`` needs, and the longest ``L`` every
layer group can serve (pure).

A request that takes its first ``L`` tokens from the cache (``L`` a multiple of tpb) then
behaves exactly like one that computed them and released its stale blocks by the manager's
rule, so a layer group needs precisely the blocks that are live at history ``L``; each life
cycle answers that itself (``LifeCycle.needed_blocks``)::

    blocks    0 .. sinks-1 | sinks ....... lo-1 | lo ........ b-1      (b = L / tpb)
    full      needed       | needed             | needed
    window    needed       | not needed (stale) | needed              lo = keep_start(L) // tpb
    chunked   (no sinks)     not needed         | current chunk
    ssm       only a state snapshot taken at exactly L, stored under block b-1
    encoder   every encoder page (its own key chain), whatever L > 0 is

``L = 0`` needs nothing anywhere, so a match always exists.

``longest_match`` finds the largest ``b`` every group accepts without testing every ``b``
against every group: each group's ``MatchSearch`` first bounds ``b`` (full attention by its
first missing block, scanning up; a window group by its sinks), then lowers ``b`` to the
highest value it accepts, scanning down from ``b`` (a missing block ``j`` rules out every
``b' > j`` whose needed range still reaches ``j``, and those ranges only move down as ``b``
does). Groups take turns until none lowers ``b``. Each group looks at each block at most
once, so a probe costs O(blocks) lookups per group, and on the common path (all cached) only
the blocks it needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import UsageError
from hybridkv.lifecycles import LifeCycle
from hybridkv.lifecycles.base import Present

I64 = npt.NDArray[np.int64]

__all__ = ["Present", "longest_match", "needed_blocks"]


def needed_blocks(lc: LifeCycle, num_blocks: int, tokens_per_block: int) -> I64:
    """Ordinals (ascending) a group of life cycle ``lc`` needs to resume at history
    ``num_blocks * tokens_per_block``; for SSM the snapshot's ordinal ``num_blocks - 1``."""
    return lc.needed_blocks(num_blocks, tokens_per_block)


def longest_match(life_cycles: Sequence[LifeCycle], present: Sequence[Present], num_blocks: int,
                  tokens_per_block: int) -> int:
    """The largest ``b <= num_blocks`` such that every group accepts history ``b * tpb``
    (``present[g](j)``: is block ``j`` cached for group ``g``); 0 when only the empty prefix."""
    if not life_cycles or len(present) != len(life_cycles):
        raise UsageError(f"longest_match needs one presence test per layer group (>= 1), got "
                         f"{len(present)} for {len(life_cycles)} groups")
    searches = [lc.match_search(p, tokens_per_block, num_blocks)
                for lc, p in zip(life_cycles, present, strict=True)]
    b = num_blocks
    for s in searches:
        b = s.sink_bound(b)
    lowered = True
    while lowered and b > 0:
        lowered = False
        for s in searches:
            h = s.highest(b)
            lowered, b = lowered or h < b, h
    return b
