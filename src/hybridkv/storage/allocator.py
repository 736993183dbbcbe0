"""Slot allocators: one per pool group per tier, bulk allocate / free in O(n) NumPy work.

Free slots sit on a stack (an int32 array and a top index); ``allocate(n)`` pops ``n`` at
once, ``free(ids)`` pushes many at once. Every slot carries a reference count: 1 when
allocated, more while several caches share it (``retain``, prefix sharing); ``free`` drops one
reference per id and a slot returns to the stack when none is left. The counts make double
frees and leaks detectable in ``check_invariants()``.

A *pin* is a reference held by a cache (the prefix cache) rather than by a request. The
allocator keeps ``num_reclaimable``, the pinned slots whose only reference is the pin (the
cache may drop them whenever it likes), exact after every operation in O(ids touched), and
queues pinned slots that just became reclaimable (``drain_reclaimed``) so the cache can keep
its eviction order incrementally instead of scanning every entry.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import InvariantError, UsageError

SlotArray = npt.NDArray[np.int32]


class SlotAllocator:
    """Fixed pool of ``num_slots`` slot ids, handed out lowest id first on a fresh pool."""

    __slots__ = ("_newly", "_pinned", "_refs", "_shared", "_stack", "_top", "name", "num_pinned",
                 "num_reclaimable", "num_slots", "peak_in_use")

    def __init__(self, num_slots: int, name: str = "pool") -> None:
        if num_slots < 0:
            raise UsageError(f"{name}: num_slots must be >= 0, got {num_slots}")
        self.name = name
        self.num_slots = num_slots
        self._stack: SlotArray = np.arange(num_slots - 1, -1, -1, dtype=np.int32)  # top = end
        self._top = num_slots
        self._refs = np.zeros(num_slots, dtype=np.int32)
        self._shared = False  # set once any slot is retained: frees must then count references
        self.peak_in_use = 0
        self._pinned = np.zeros(num_slots, dtype=np.bool_)
        self.num_pinned = 0
        self.num_reclaimable = 0  # pinned slots whose only reference is the pin
        self._newly: list[SlotArray] = []  # pinned slots that became reclaimable, not yet drained

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_in_use(self) -> int:
        return self.num_slots - self._top

    @property
    def shared(self) -> bool:
        """Whether any slot was ever retained (frees must then count references)."""
        return self._shared

    def allocate(self, n: int) -> SlotArray | None:
        """``n`` distinct free slot ids (one reference each), or None (nothing changed) if fewer
        are free."""
        if n > self._top:
            return None
        if n < 0:
            raise UsageError(f"{self.name}: cannot allocate {n} slots")
        self._top -= n
        ids = self._stack[self._top:self._top + n][::-1].copy()
        self._refs[ids.astype(np.intp)] = 1  # NumPy indexes ~3x faster with intp than int32
        self.peak_in_use = max(self.peak_in_use, self.num_in_use)
        return ids

    def _check_held(self, arr: SlotArray) -> None:
        if int(arr.min()) < 0 or int(arr.max()) >= self.num_slots or not (self._refs[arr.astype(np.intp)] > 0).all():
            inside = (arr >= 0) & (arr < self.num_slots)
            bad = arr[~inside].tolist() + arr[inside][self._refs[arr[inside]] == 0].tolist()
            raise UsageError(f"{self.name}: slots that are not allocated: {bad[:8]} "
                             f"(pool of {self.num_slots} slots)")

    def retain(self, ids: npt.ArrayLike) -> None:
        """One more reference to each id (repeats count); UsageError if one is not allocated."""
        arr = np.asarray(ids, dtype=np.int32).ravel()
        if arr.size == 0:
            return
        self._check_held(arr)
        if self.num_pinned:
            self.num_reclaimable -= int(self.is_reclaimable(np.unique(arr)).sum())
        np.add.at(self._refs, arr, 1)
        self._shared = True

    def free(self, ids: npt.ArrayLike, distinct: bool = False, trusted: bool = False) -> None:
        """Drop one reference per id (repeats drop several); slots left with none return to
        the pool. UsageError (nothing changed) if an id is not allocated or is dropped more
        times than it is held. ``distinct=True``: the caller guarantees no repeats (block-table
        entries of one request), which skips the sort while no slot is shared; once slots are
        shared, several tables can name one page and repeats are always counted.
        ``trusted=True``: the ids come from the manager's own block tables, which
        ``check_invariants`` proves are held; the hot path skips re-checking them."""
        arr = np.asarray(ids, dtype=np.int32).ravel()
        if arr.size == 0:
            return
        if not trusted:
            self._check_held(arr)
        uniq: npt.NDArray[np.int32] = arr
        counts: npt.NDArray[np.int64] = np.ones(1, np.int64)
        if arr.size > 1 and (self._shared or not distinct):
            uniq, counts = np.unique(arr, return_counts=True)
        if not self._shared and counts.max() == 1:  # nothing is shared: every id goes back
            self._refs[uniq.astype(np.intp)] = 0
            gone = uniq
        else:
            before = self._refs[uniq]
            if (before < counts).any():
                raise UsageError(f"{self.name}: a slot freed more times than it is held")
            after = before - counts.astype(np.int32)
            if self.num_pinned:
                self._track_pins(uniq, before, after)
            self._refs[uniq] = after
            gone = uniq[after == 0]
        self._stack[self._top:self._top + gone.size] = gone
        self._top += gone.size

    def _track_pins(self, uniq: SlotArray, before: npt.NDArray[np.int32], after: npt.NDArray[np.int32]) -> None:
        """Keep ``num_reclaimable`` exact across a free; a pin is dropped only by ``unpin``."""
        pinned = self._pinned[uniq]
        if not pinned.any():
            return
        if (pinned & (after == 0)).any():
            raise UsageError(f"{self.name}: a free would drop a pinned slot's last reference (unpin it)")
        became = pinned & (after == 1) & (before > 1)
        self.num_reclaimable += int(became.sum())
        if became.any():
            self._newly.append(uniq[became])

    # ---- pins: references held by a cache -------------------------------------------------
    def pin(self, ids: npt.ArrayLike, retain: bool = True) -> None:
        """Mark distinct, allocated, unpinned slots as pinned by the cache: with ``retain`` the
        pin is one more reference; without, the caller's own reference becomes the pin."""
        arr = np.asarray(ids, dtype=np.int32).ravel()
        if arr.size == 0:
            return
        self._check_held(arr)
        if self._pinned[arr].any() or np.unique(arr).size != arr.size:
            raise UsageError(f"{self.name}: pin of a slot that is already pinned (or named twice)")
        if retain:
            self.retain(arr)
        self._pinned[arr] = True
        self.num_pinned += int(arr.size)
        sole = self._refs[arr] == 1
        self.num_reclaimable += int(sole.sum())
        if sole.any():
            self._newly.append(arr[sole])

    def unpin(self, ids: npt.ArrayLike, free: bool = True) -> None:
        """Drop the cache's pin on distinct pinned slots; with ``free`` its reference too
        (without, the reference stays with the caller, e.g. a page about to be moved)."""
        arr = np.asarray(ids, dtype=np.int32).ravel()
        if arr.size == 0:
            return
        self._check_held(arr)
        if not self._pinned[arr].all() or np.unique(arr).size != arr.size:
            raise UsageError(f"{self.name}: unpin of a slot that is not pinned (or named twice)")
        self.num_reclaimable -= int(self.is_reclaimable(arr).sum())
        self._pinned[arr] = False
        self.num_pinned -= int(arr.size)
        if free:
            self.free(arr, distinct=True)

    def is_pinned(self, ids: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        out: npt.NDArray[np.bool_] = self._pinned[np.asarray(ids, dtype=np.int64)]
        return out

    def is_reclaimable(self, ids: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Which of these slots are pinned and held by the pin alone."""
        idx = np.asarray(ids, dtype=np.intp)
        out: npt.NDArray[np.bool_] = self._pinned[idx] & (self._refs[idx] == 1)
        return out

    def reclaimable_slots(self) -> SlotArray:
        """Pinned slots whose only reference is the pin (O(num_slots): for checks and rebuilds)."""
        out: SlotArray = np.flatnonzero(self._pinned & (self._refs == 1)).astype(np.int32)
        return out

    def drain_reclaimed(self) -> SlotArray:
        """Pinned slots that became reclaimable since the last drain (may repeat, may since have
        been retained again: the reader re-checks)."""
        if not self._newly:
            return np.zeros(0, np.int32)
        out = np.concatenate(self._newly)
        self._newly.clear()
        return out

    def is_allocated(self, ids: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        out: npt.NDArray[np.bool_] = self._refs[np.asarray(ids, dtype=np.int64)] > 0
        return out

    def references(self, ids: npt.ArrayLike) -> npt.NDArray[np.int32]:
        out: npt.NDArray[np.int32] = self._refs[np.asarray(ids, dtype=np.int64)]
        return out

    def reset_peak(self) -> None:
        self.peak_in_use = self.num_in_use

    def check_invariants(self) -> None:
        free = self._stack[:self._top]
        if np.unique(free).size != free.size:
            raise InvariantError(f"{self.name}: a slot is on the free stack twice")
        if self._refs[free].any():
            raise InvariantError(f"{self.name}: a free slot still has references")
        if (self._refs < 0).any():
            raise InvariantError(f"{self.name}: a negative reference count")
        held = int((self._refs > 0).sum())
        if held != self.num_in_use:
            raise InvariantError(f"{self.name}: {held} slots referenced, counter says {self.num_in_use}")
        if (self._pinned & (self._refs == 0)).any() or int(self._pinned.sum()) != self.num_pinned:
            raise InvariantError(f"{self.name}: pinned count {self.num_pinned} differs from the pinned slots")
        if self.reclaimable_slots().size != self.num_reclaimable:
            raise InvariantError(f"{self.name}: {self.reclaimable_slots().size} pinned slots held only by the "
                                 f"pin, counter says {self.num_reclaimable}")
