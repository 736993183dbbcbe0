"""Slot allocators: one per pool group per tier, bulk allocate / free in O(n) NumPy work.

Free slots sit on a stack (an int32 array and a top index); ``allocate(n)`` pops ``n`` at
once, ``free(ids)`` pushes many at once. Every slot carries a reference count: 1 when
allocated, more while several caches share it (``retain``, prefix sharing); ``free`` drops one
reference per id and a slot returns to the stack when none is left. The counts make double
frees and leaks detectable in ``check_invariants()``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from hybridkv.errors import InvariantError, UsageError

SlotArray = npt.NDArray[np.int32]


class SlotAllocator:
    """Fixed pool of ``num_slots`` slot ids, handed out lowest id first on a fresh pool."""

    __slots__ = ("_refs", "_shared", "_stack", "_top", "name", "num_slots", "peak_in_use")

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
        self._refs[ids] = 1
        self.peak_in_use = max(self.peak_in_use, self.num_in_use)
        return ids

    def _check_held(self, arr: SlotArray) -> None:
        if int(arr.min()) < 0 or int(arr.max()) >= self.num_slots or not (self._refs[arr] > 0).all():
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
        np.add.at(self._refs, arr, 1)
        self._shared = True

    def free(self, ids: npt.ArrayLike, distinct: bool = False) -> None:
        """Drop one reference per id (repeats drop several); slots left with none return to
        the pool. UsageError (nothing changed) if an id is not allocated or is dropped more
        times than it is held. ``distinct=True``: the caller guarantees no repeats
        (block-table entries of one request), which skips the sort."""
        arr = np.asarray(ids, dtype=np.int32).ravel()
        if arr.size == 0:
            return
        self._check_held(arr)
        uniq: npt.NDArray[np.int32] = arr
        counts: npt.NDArray[np.int64] = np.ones(1, np.int64)
        if not (distinct or arr.size == 1):
            uniq, counts = np.unique(arr, return_counts=True)
        if not self._shared and counts.max() == 1:  # nothing is shared: every id goes back
            self._refs[uniq] = 0
            gone = uniq
        else:
            if (self._refs[uniq] < counts).any():
                raise UsageError(f"{self.name}: a slot freed more times than it is held")
            self._refs[uniq] -= counts
            gone = uniq[self._refs[uniq] == 0]
        self._stack[self._top:self._top + gone.size] = gone
        self._top += gone.size

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
