"""Prefix sharing between caches: ``fork`` a new cache from the first tokens of another.

Full blocks of the prefix are shared, not copied: both block tables hold the same slot and
the slot's reference count goes up (it returns to the pool when the last holder lets go, so
a window release or a close in one cache never frees a page another still reads). A partly
filled last block is copied into a new slot, never shared, so neither cache ever writes into
a page the other reads. SSM state is per request: the fork gets a copy of the state, which
exists only at the donor's capacity (the engine has run every position below it). A window
group needs only the blocks still live at the fork point; if the donor already released one
of them the prefix cannot be served. This is the mechanism prefix reuse (radix tree, parallel
sampling, beam search) builds on.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import UsageError
from hybridkv.core.types import GPU, CacheHandle
from hybridkv.lifecycles import ForkPages
from hybridkv.manager.rows import NULL_SLOT
from hybridkv.manager.state import RequestState
from hybridkv.manager.view import ManagerView

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]


def _prefix_pages(m: ManagerView, row: int, tokens: int) -> list[tuple[ForkPages, I32]]:
    """Per layer group: what a fork at ``tokens`` takes (its life cycle says which blocks, and
    which are copied) and the donor's slots for them. UsageError when the donor no longer
    holds one of them."""
    tpb, out = m.tokens_per_block, []
    for lg in m.grouped.layer_groups:
        pages = lg.life_cycle.fork_pages(tokens, tpb)
        slots = m.rows.tables[lg.id][row][pages.ordinals]
        if (slots == NULL_SLOT).any():
            b = int(pages.ordinals[slots == NULL_SLOT][0])
            raise UsageError(f"cannot share {tokens} tokens: layer group {lg.id} "
                             f"({lg.life_cycle.describe()}) already released block {b}")
        out.append((pages, slots.copy()))
    return out


def fork(m: ManagerView, handle: CacheHandle, tokens: int) -> CacheHandle | None:
    """A new active cache whose first ``tokens`` tokens are ``handle``'s (committed) tokens:
    capacity = history = committed = ``tokens``. None (nothing changed) when no active row or
    not enough free slots for the copied pages; UsageError when the prefix cannot be served."""
    if m.state(handle) is not RequestState.ACTIVE:
        raise UsageError(f"fork({handle}): the donor must be active (resume it first)")
    lengths = m.lengths(handle)
    if not 0 < tokens <= lengths.committed:
        raise UsageError(f"fork({handle}, {tokens}): need 0 < tokens <= committed ({lengths.committed})")
    for lg in m.grouped.layer_groups:
        reason = lg.life_cycle.fork_refusal(tokens, lengths.capacity)
        if reason is not None:
            raise UsageError(f"fork({handle}, {tokens}): layer group {lg.id}: {reason} "
                             f"(history {lengths.history}, committed {lengths.committed})")
    if m.rows.n == m.rows.max_rows:
        return None
    row = m.caches.row(handle)
    pages = _prefix_pages(m, row, tokens)
    need = [0] * len(m.grouped.pool_groups)
    for lg, (fp, _) in zip(m.grouped.layer_groups, pages, strict=True):
        need[lg.pool_group] += int(fp.copied.sum())
    if not m.make_room(need):
        return None
    child = m.create(int(m.rows.priority[row]))
    cache = m.suspended[child]
    child_row = m.rows.add(child, tokens, tokens, tokens, int(m.rows.priority[row]))
    gpu = m.tiers.allocators[GPU]
    for lg, (fp, slots) in zip(m.grouped.layer_groups, pages, strict=True):
        alloc, mask = gpu[lg.pool_group], fp.copied
        alloc.retain(slots[~mask])
        new = slots.copy()
        if mask.any():
            new[mask] = m.tiers.copy_to_fresh(lg.pool_group, slots[mask])  # room checked above
        released = max(cache.released[lg.id], lg.life_cycle.stale_range(tokens, m.tokens_per_block).stop)
        m.rows.set_pages(child_row, lg.id, fp.ordinals, new, released)
    m.tiers.copy_engine.wait_for_copies()
    m.caches.activate(child, child_row)
    m.counters.forks += 1
    return child
