"""Which pages the prefix cache could drop right now on one tier, kept incrementally.

A page the cache pins is *reclaimable* while the pin is its only reference: no request reads
it. The allocator keeps that count exact (``num_reclaimable``) and queues the pinned slots
that just became reclaimable; this module turns those slots into index rows and keeps one
heap per pool group ordered by the index's eviction keys (priority, then least recently
used, then depth). Items are never updated in place: a touch pushes a new item and the old
one goes stale. An item is taken only if it is still *current*: its row is live, on this
tier, in the same slot, its key unchanged, and the slot still held by the pin alone. So asking for
``k`` victims costs O(k log n) plus the stale items skipped, not a sort of every entry; a
heap grown past twice its candidates plus a margin is rebuilt from the allocator.

One instance per tier: on the GPU the pages make room for steps; on the host and disk they
make room for suspended caches moving down (a suspended request's pages are worth more than
a cached prefix nobody uses).

Invariant (``check``): every reclaimable page has a current item in its pool's heap.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from hybridkv.errors import InvariantError
from hybridkv.reuse import PrefixIndex
from hybridkv.storage.allocator import SlotAllocator
from hybridkv.types import Tier

I64 = npt.NDArray[np.int64]
_NO_ROW = -1
_REBUILD_MARGIN = 4096


class PinnedPages:
    """Per pool group of one tier: slot -> index row of the entry pinning it, and the eviction heap."""

    def __init__(self, index: PrefixIndex, tier: Tier, allocators: list[SlotAllocator],
                 pool_of_group: list[int]) -> None:
        self.index, self.tier, self.allocators, self.pool_of_group = index, tier, allocators, pool_of_group
        self.row_of_slot = [np.full(a.num_slots, _NO_ROW, np.int64) for a in allocators]
        self.heaps: list[list[tuple[int, ...]]] = [[] for _ in allocators]

    # ---- bookkeeping calls from the prefix cache ----------------------------------------
    def placed(self, pool_group: int, slots: npt.ArrayLike, rows: npt.ArrayLike) -> None:
        """Entries ``rows`` now pin ``slots`` of this tier (published, or moved here)."""
        self.row_of_slot[pool_group][np.asarray(slots, np.int64)] = np.asarray(rows, np.int64)

    def left(self, pool_group: int, slots: npt.ArrayLike) -> None:
        """``slots`` of this tier no longer hold a cached entry (dropped or moved away)."""
        self.row_of_slot[pool_group][np.asarray(slots, np.int64)] = _NO_ROW

    def touched(self, rows: I64) -> None:
        """The index changed these rows' keys (a hit touched them): re-push the reclaimable ones."""
        if rows.size == 0:
            return
        groups, tiers, slots = self.index.row_locations(rows)
        pools = np.asarray(self.pool_of_group, np.int64)[groups]
        for pg, alloc in enumerate(self.allocators):
            sel = (pools == pg) & (tiers == int(self.tier))
            if sel.any():
                s = slots[sel]
                sole = alloc.is_pinned(s) & (alloc.references(s) == 1)
                self._push(pg, rows[sel][sole])

    # ---- queries -------------------------------------------------------------------------
    def reclaimable(self) -> list[int]:
        """Reclaimable pages per pool group on this tier: O(1)."""
        return [a.num_reclaimable for a in self.allocators]

    def protected(self, keys: Iterable[bytes] | None) -> list[int]:
        """Per pool group, reclaimable pages among the entries of ``keys`` (a match being
        served must not lose them, so they do not count as room)."""
        out = [0] * len(self.allocators)
        if keys is None:
            return out
        keys = list(keys)
        for g, pg in enumerate(self.pool_of_group):
            _, tiers, slots = self.index.row_locations(self.index.rows_of(keys, g))
            s = slots[tiers == int(self.tier)]
            alloc = self.allocators[pg]
            out[pg] += int((alloc.is_pinned(s) & (alloc.references(s) == 1)).sum())
        return out

    def take(self, pool_group: int, count: int, keep: set[bytes]) -> list[tuple[int, int]]:
        """Up to ``count`` (row, slot) victims of one pool group, first in eviction order, none
        named in ``keep``; they leave the heap (the caller drops or moves them at once)."""
        self._refresh(pool_group)
        heap, kept, seen = self.heaps[pool_group], [], set()
        out: list[tuple[int, int]] = []
        while heap and len(out) < count:
            item = heapq.heappop(heap)
            row = int(item[-1])
            slot = self._current_slot(pool_group, item)
            if slot is None or row in seen:  # stale, or a duplicate push of a row already taken
                continue
            seen.add(row)
            if keep and self.index.ref_at(row).key in keep:
                kept.append(item)
                continue
            out.append((row, slot))
        for item in kept:
            heapq.heappush(heap, item)
        return out

    def _current_slot(self, pool_group: int, item: tuple[int, ...]) -> int | None:
        row = int(item[-1])
        if not self.index.is_live(row):
            return None
        tier, slot = self.index.row_location(row)
        if tier is not self.tier or self.row_of_slot[pool_group][slot] != row:
            return None
        alloc = self.allocators[pool_group]
        if alloc.references([slot])[0] != 1 or self.index.eviction_keys(np.array([row]))[0] != item:
            return None
        return slot

    # ---- the heaps -----------------------------------------------------------------------
    def _push(self, pool_group: int, rows: I64) -> None:
        heap = self.heaps[pool_group]
        for item in self.index.eviction_keys(rows):
            heapq.heappush(heap, item)

    def _refresh(self, pool_group: int) -> None:
        """Push the slots the allocator reports as newly reclaimable; rebuild a bloated heap."""
        alloc = self.allocators[pool_group]
        slots = alloc.drain_reclaimed().astype(np.int64)
        if len(self.heaps[pool_group]) + slots.size > 2 * alloc.num_reclaimable + _REBUILD_MARGIN:
            slots = alloc.reclaimable_slots().astype(np.int64)
            self.heaps[pool_group] = []
            rows = self.row_of_slot[pool_group][slots]
            items = self.index.eviction_keys(rows[rows != _NO_ROW])
            heapq.heapify(items)
            self.heaps[pool_group] = items
            return
        if slots.size:
            sole = alloc.references(slots) == 1
            rows = self.row_of_slot[pool_group][slots[sole]]
            self._push(pool_group, rows[rows != _NO_ROW])

    def check(self) -> None:
        """Every reclaimable page is pinned by an entry and has a current heap item."""
        for pg, alloc in enumerate(self.allocators):
            self._refresh(pg)
            slots = alloc.reclaimable_slots().astype(np.int64)
            rows = self.row_of_slot[pg][slots]
            if (rows == _NO_ROW).any():
                raise InvariantError(f"{self.tier.name} pool group {pg}: a pinned slot with no cached entry")
            current = {int(item[-1]) for item in self.heaps[pg] if self._current_slot(pg, item) is not None}
            missing = set(rows.tolist()) - current
            if missing:
                raise InvariantError(f"{self.tier.name} pool group {pg}: reclaimable entries {sorted(missing)[:8]} "
                                     "are not in the "
                                     "eviction heap")
