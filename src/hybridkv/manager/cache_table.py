"""The cache table: every cache handle's state, its active row, and the records of suspended
caches. One part owns them, so a handle's state and row change together in one place and the
transition rules (state.py) are checked on the way in.

Handles are dense ints from 0; a handle is never reused (a closed cache's handle stays
closed), so an engine that keeps a stale handle gets a clear UsageError, not another cache.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import InvariantError, UsageError
from hybridkv.core.types import CacheHandle
from hybridkv.manager.state import RequestState
from hybridkv.manager.suspended import SuspendedCache

I64 = npt.NDArray[np.int64]
NOT_ACTIVE = -1


class CacheTable:
    """State per cache handle, row per active handle, and suspended records."""

    def __init__(self) -> None:
        self._state = np.zeros(1024, np.int8)
        self._row = np.full(1024, NOT_ACTIVE, np.int64)
        self._num_handles = 0
        self.suspended: dict[int, SuspendedCache] = {}

    @property
    def num_handles(self) -> int:
        return self._num_handles

    def create(self, record: SuspendedCache) -> CacheHandle:
        """A new handle in the SUSPENDED state with this (empty) record."""
        h = self._num_handles
        if h == self._state.size:
            self._state = np.concatenate([self._state, np.zeros(h, np.int8)])
            self._row = np.concatenate([self._row, np.full(h, NOT_ACTIVE, np.int64)])
        self._num_handles += 1
        self._state[h] = RequestState.SUSPENDED
        record.handle = h
        self.suspended[h] = record
        return CacheHandle(h)

    def view(self) -> tuple[I64, I64]:
        """Copies of (state, row) for every handle so far, for snapshots and reports."""
        n = self._num_handles
        return self._state[:n].astype(np.int64), self._row[:n].copy()

    def check(self, handle: int) -> None:
        if not 0 <= int(handle) < self._num_handles:
            raise UsageError(f"unknown request handle {handle}")

    def state(self, handle: int) -> RequestState:
        self.check(handle)
        return RequestState(int(self._state[handle]))

    def states(self, handles: I64) -> I64:
        """States (RequestState values) of known handles (UsageError naming unknown ones)."""
        self._check_many(handles, "unknown request handle(s)")
        out: I64 = self._state[handles].astype(np.int64)
        return out

    def row(self, handle: int) -> int:
        """The active row of an active handle."""
        return int(self._row[handle])

    def rows(self, handles: I64) -> I64:
        """Rows of active handles (UsageError naming any handle that is not active)."""
        self._check_many(handles, "unknown request handle(s)")
        rows: I64 = self._row[handles]
        if handles.size and int(rows.min()) < 0:
            bad = handles[rows < 0][:8].tolist()
            raise UsageError(f"request(s) {bad} are not active (resume them first)")
        return rows

    def _check_many(self, h: I64, what: str) -> None:
        if h.size and (int(h.min()) < 0 or int(h.max()) >= self._num_handles):
            raise UsageError(f"{what}: {h[(h < 0) | (h >= self._num_handles)][:8].tolist()}")

    # ---- transitions (the caller checked them with state.check_transition) ---------------
    def activate(self, handle: int, row: int) -> None:
        """SUSPENDED -> ACTIVE in ``row`` (its record, if any, is dropped)."""
        self.suspended.pop(handle, None)
        self._row[handle], self._state[handle] = row, RequestState.ACTIVE

    def deactivate(self, handle: int, record: SuspendedCache) -> None:
        """ACTIVE -> SUSPENDED with the record of its pages."""
        self.suspended[handle] = record
        self._row[handle], self._state[handle] = NOT_ACTIVE, RequestState.SUSPENDED

    def close(self, handles: I64 | int) -> None:
        """-> CLOSED (records of suspended ones dropped)."""
        for h in np.atleast_1d(np.asarray(handles, np.int64)).tolist():
            self.suspended.pop(h, None)
        self._row[handles], self._state[handles] = NOT_ACTIVE, RequestState.CLOSED

    def moved(self, handles: I64 | int, rows: I64 | int) -> None:
        """Active handles whose rows moved (the rows compacted)."""
        self._row[handles] = rows

    # ---- invariants ------------------------------------------------------------------------
    def check_invariants(self, row_handles: I64) -> None:
        """``row_handles[r]`` is the handle in active row ``r``: rows and states agree, and
        every suspended record belongs to a suspended handle and vice versa."""
        n = row_handles.size
        if not (self._row[row_handles] == np.arange(n)).all() or \
                not (self._state[row_handles] == RequestState.ACTIVE).all():
            raise InvariantError("row index and handle index disagree")
        for h in self.suspended:
            if self._state[h] != RequestState.SUSPENDED or self._row[h] >= 0:
                raise InvariantError(f"request {h}: suspended record but state {self._state[h]}")
        states = self._state[:self._num_handles]
        if int((states == RequestState.SUSPENDED).sum()) != len(self.suspended):
            raise InvariantError("suspended count differs from suspended records")
        if int((states == RequestState.ACTIVE).sum()) != n:
            raise InvariantError("active count differs from active rows")
