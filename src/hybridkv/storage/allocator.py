"""Slot allocators: one per pool group per tier, bulk allocate / free in O(n) NumPy work.

Free slots sit on a stack (an int32 array and a top index); ``allocate(n)`` pops ``n`` at
once, ``free(ids)`` pushes many at once. An ``in_use`` bitmap makes double frees and leaks
detectable in ``check_invariants()``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from hybridkv.errors import InvariantError, UsageError

SlotArray = npt.NDArray[np.int32]


class SlotAllocator:
    """Fixed pool of ``num_slots`` slot ids, handed out lowest id first on a fresh pool."""

    __slots__ = ("_in_use", "_stack", "_top", "name", "num_slots", "peak_in_use")

    def __init__(self, num_slots: int, name: str = "pool") -> None:
        if num_slots < 0:
            raise UsageError(f"{name}: num_slots must be >= 0, got {num_slots}")
        self.name = name
        self.num_slots = num_slots
        self._stack: SlotArray = np.arange(num_slots - 1, -1, -1, dtype=np.int32)  # top = end
        self._top = num_slots
        self._in_use = np.zeros(num_slots, dtype=bool)
        self.peak_in_use = 0

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_in_use(self) -> int:
        return self.num_slots - self._top

    def allocate(self, n: int) -> SlotArray | None:
        """``n`` distinct free slot ids, or None (nothing changed) if fewer are free."""
        if n > self._top:
            return None
        if n < 0:
            raise UsageError(f"{self.name}: cannot allocate {n} slots")
        self._top -= n
        ids = self._stack[self._top:self._top + n][::-1].copy()
        self._in_use[ids] = True
        self.peak_in_use = max(self.peak_in_use, self.num_in_use)
        return ids

    def free(self, ids: npt.ArrayLike, distinct: bool = False) -> None:
        """Return slots to the pool; UsageError (nothing changed) if any is not in use or one
        appears twice. ``distinct=True``: the caller guarantees no repeats (block-table
        entries), which skips the sort that checks it."""
        arr = np.asarray(ids, dtype=np.int32).ravel()
        if arr.size == 0:
            return
        if int(arr.min()) < 0 or int(arr.max()) >= self.num_slots or not self._in_use[arr].all():
            inside = (arr >= 0) & (arr < self.num_slots)
            bad = arr[~inside].tolist() + arr[inside][~self._in_use[arr[inside]]].tolist()
            raise UsageError(f"{self.name}: freeing slots that are not allocated: {bad[:8]} "
                             f"(pool of {self.num_slots} slots)")
        if not distinct and arr.size > 1 and not np.diff(np.sort(arr)).all():
            raise UsageError(f"{self.name}: the same slot freed twice in one call")
        self._in_use[arr] = False
        self._stack[self._top:self._top + arr.size] = arr
        self._top += arr.size

    def is_allocated(self, ids: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        return self._in_use[np.asarray(ids, dtype=np.int64)]

    def reset_peak(self) -> None:
        self.peak_in_use = self.num_in_use

    def check_invariants(self) -> None:
        free = self._stack[:self._top]
        if np.unique(free).size != free.size:
            raise InvariantError(f"{self.name}: a slot is on the free stack twice")
        if self._in_use[free].any():
            raise InvariantError(f"{self.name}: a free slot is marked in use")
        if int(self._in_use.sum()) != self.num_in_use:
            raise InvariantError(f"{self.name}: {int(self._in_use.sum())} slots marked in use, "
                                 f"counter says {self.num_in_use}")
