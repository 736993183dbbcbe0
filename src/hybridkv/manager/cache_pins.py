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

from hybridkv.core.errors import InvariantError
from hybridkv.core.types import TierId
from hybridkv.reuse import PrefixIndex
from hybridkv.reuse.eviction import ROW_MASK
from hybridkv.storage.allocator import SlotAllocator

I64 = npt.NDArray[np.int64]
_NO_ROW = -1
_REBUILD_MARGIN = 4096


class PinnedPages:
    """Per pool group of one tier: slot -> index row of the entry pinning it, and the eviction heap."""

    def __init__(self, index: PrefixIndex, tier: TierId, allocators: list[SlotAllocator],
                 pool_of_group: list[int]) -> None:
        self.index, self.tier, self.allocators, self.pool_of_group = index, tier, allocators, pool_of_group
        self.row_of_slot = [np.full(a.num_slots, _NO_ROW, np.int64) for a in allocators]
        self.heaps: list[list[int]] = [[] for _ in allocators]

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
                self._push(pg, rows[sel][alloc.is_reclaimable(slots[sel])])

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
            out[pg] += int(self.allocators[pg].is_reclaimable(slots[tiers == int(self.tier)]).sum())
        return out

    def take(self, pool_group: int, count: int, keep: set[bytes]) -> tuple[I64, I64]:
        """Up to ``count`` victims of one pool group as (index rows, slots), first in eviction
        order, none named in ``keep``; they leave the heap (the caller drops or moves them at
        once). Candidates are popped and checked in batches (one vectorized check per batch)."""
        self._refresh(pool_group)
        heap, kept, seen = self.heaps[pool_group], [], set()
        out: list[tuple[int, int]] = []
        while heap and len(out) < count:
            batch = [heapq.heappop(heap) for _ in range(min(len(heap), count - len(out)))]
            rows = np.fromiter((item & ROW_MASK for item in batch), np.int64, len(batch))
            current, slots = self._current(pool_group, batch, rows)
            for item, row, slot, ok in zip(batch, rows.tolist(), slots.tolist(), current.tolist(), strict=True):
                if not ok or row in seen:  # stale, or a duplicate push of a row already taken
                    continue
                seen.add(row)
                if keep and self.index.ref_at(row).key in keep:
                    kept.append(item)
                    continue
                out.append((row, slot))
        for item in kept:
            heapq.heappush(heap, item)
        return (np.array([r for r, _ in out], np.int64), np.array([s for _, s in out], np.int64))

    def _current(self, pool_group: int, items: list[int], rows: I64) -> tuple[npt.NDArray[np.bool_], I64]:
        """Per item: whether it still names a reclaimable page of this tier with its current
        key; and the page's slot."""
        groups, tiers, slots = self.index.row_locations(rows)
        # a row dropped and reused since the push may name another pool group's entry now
        ok = self.index.live_mask(rows) & (tiers == int(self.tier))
        ok &= np.asarray(self.pool_of_group, np.int64)[groups] == pool_group
        safe = np.where(ok, slots, 0)
        ok &= self.row_of_slot[pool_group][safe] == rows
        ok &= self.allocators[pool_group].is_reclaimable(safe)
        if ok.any():
            keys = self.index.eviction_keys(rows)
            ok &= np.fromiter((k == item for k, item in zip(keys, items, strict=True)), np.bool_, len(items))
        return ok, slots

    # ---- the heaps -----------------------------------------------------------------------
    def _refresh(self, pool_group: int) -> None:
        """Push the slots the allocator reports as newly reclaimable; rebuild a bloated heap."""
        alloc = self.allocators[pool_group]
        slots = alloc.drain_reclaimed().astype(np.int64)
        if len(self.heaps[pool_group]) + slots.size > 2 * alloc.num_reclaimable + _REBUILD_MARGIN:
            slots = alloc.reclaimable_slots().astype(np.int64)
            rows = self.row_of_slot[pool_group][slots]
            items = self.index.eviction_keys(rows[rows != _NO_ROW])
            heapq.heapify(items)
            self.heaps[pool_group] = items
            return
        if slots.size:  # drained slots may have been retained or unpinned since
            rows = self.row_of_slot[pool_group][slots[alloc.is_reclaimable(slots)]]
            self._push(pool_group, rows[rows != _NO_ROW])

    def _push(self, pool_group: int, rows: I64) -> None:
        """Push items for ``rows``; a large batch is merged with one heapify (O(n)) instead
        of n pushes (O(n log n))."""
        heap = self.heaps[pool_group]
        items = self.index.eviction_keys(rows)
        if len(items) > 64 and len(items) * 8 > len(heap):
            heap.extend(items)
            heapq.heapify(heap)
            return
        for item in items:
            heapq.heappush(heap, item)

    def check(self) -> None:
        """Every reclaimable page is pinned by an entry and has a current heap item."""
        for pg, alloc in enumerate(self.allocators):
            self._refresh(pg)
            slots = alloc.reclaimable_slots().astype(np.int64)
            rows = self.row_of_slot[pg][slots]
            if (rows == _NO_ROW).any():
                raise InvariantError(f"tier {self.tier} pool group {pg}: a pinned slot with no cached entry")
            heap = self.heaps[pg]
            rows_in = np.fromiter((item & ROW_MASK for item in heap), np.int64, len(heap))
            ok, _ = self._current(pg, heap, rows_in) if heap else (np.zeros(0, np.bool_), rows_in)
            current = set(rows_in[ok].tolist())
            missing = set(rows.tolist()) - current
            if missing:
                raise InvariantError(f"tier {self.tier} pool group {pg}: reclaimable entries {sorted(missing)[:8]} "
                                     "are not in the eviction heap")
