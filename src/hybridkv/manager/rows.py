"""Hot state of the active requests, structure of arrays, one dense row per active request.

Rows ``[0, n)`` are the active requests; removing one moves the last row into the hole, so
the rows stay dense and ``block_table[:n]`` is a kernel-ready table for "every active
request" with no copy. Per layer group a preallocated int32 block table
``[max_rows, max_blocks]`` maps block ordinal -> slot id; entries without a page hold
``NULL_SLOT`` (-1, so a kernel that read one would fault instead of reading another
request's page). Every layer group also keeps ``released[row]``: blocks
``[sink_blocks, released)`` were stale and went back to the pool (an empty range for life
cycles that never go stale).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import UsageError
from hybridkv.layouts.grouping import GroupedLayout
from hybridkv.lifecycles import LifeCycle

NULL_SLOT = -1
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]


class TableChange(NamedTuple):
    """Entries of one layer group's block table that changed: ``table[rows, cols] = slots``.
    The change log lets a GPU mirror of the tables be patched instead of re-uploaded."""

    layer_group: int
    rows: npt.NDArray[np.int64]
    cols: npt.NDArray[np.int64]
    slots: npt.NDArray[np.int32]


class Family(NamedTuple):
    """Layer groups of one life cycle in one pool group (the page-sized parts of a life cycle
    in a shared arena): their block tables are slices ``table[:, :, j]`` of one array, so a
    step frees and fills all of them with one pass; one stale-stop array serves them all."""

    life_cycle: LifeCycle
    pool_group: int
    members: tuple[int, ...]  # layer group ids; member j is table[:, :, j]
    table: npt.NDArray[np.int32]  # [max_rows, width, len(members)]
    released: I64


class ActiveRows:
    """Per-row arrays for active requests; the manager owns one."""

    def __init__(self, grouped: GroupedLayout, max_rows: int, max_seq_len: int) -> None:
        tpb = grouped.tokens_per_block
        self.max_rows = max_rows
        self.n = 0
        self.handle: I64 = np.zeros(max_rows, np.int64)
        self.capacity: I64 = np.zeros(max_rows, np.int64)
        self.history: I64 = np.zeros(max_rows, np.int64)
        self.committed: I64 = np.zeros(max_rows, np.int64)
        self.priority: I64 = np.zeros(max_rows, np.int64)
        self.seq_lens: I32 = np.zeros(max_rows, np.int32)  # = capacity, int32 for kernels
        self.life_cycles = [lg.life_cycle for lg in grouped.layer_groups]
        self.first_stale = [lc.sink_blocks(tpb) for lc in self.life_cycles]
        self.log: list[TableChange] | None = None  # enabled by a GPU table mirror
        members: dict[tuple[LifeCycle, int], list[int]] = {}
        for lg in grouped.layer_groups:
            members.setdefault((lg.life_cycle, int(lg.pool_group)), []).append(int(lg.id))
        self.families: list[Family] = []
        self.tables: list[I32] = [np.zeros((0, 0), np.int32)] * len(self.life_cycles)
        self.released: list[I64] = [np.zeros(0, np.int64)] * len(self.life_cycles)
        for (lc, pg), ids in members.items():
            table = np.full((max_rows, lc.table_width(max_seq_len, tpb), len(ids)), NULL_SLOT, np.int32)
            family = Family(lc, pg, tuple(ids), table, np.zeros(max_rows, np.int64))
            self.families.append(family)
            for j, g in enumerate(ids):
                self.tables[g] = table[:, :, j]
                self.released[g] = family.released

    def add(self, handle: int, capacity: int, history: int, committed: int, priority: int) -> int:
        """Append a row (tables all NULL); the caller fills its pages. Returns the row."""
        if self.n == self.max_rows:
            raise UsageError(f"all {self.max_rows} active rows are taken (max_active_requests)")
        row = self.n
        self.n += 1
        self.handle[row], self.priority[row] = handle, priority
        self.capacity[row], self.history[row], self.committed[row] = capacity, history, committed
        self.seq_lens[row] = capacity
        for f in self.families:
            f.table[row] = NULL_SLOT
            f.released[row] = self.first_stale[f.members[0]]
        self._log_rows(row)
        return row

    def _row_arrays(self) -> list[I32 | I64]:
        """Every per-row array: what moves when a row moves."""
        arrays: list[I32 | I64] = [self.handle, self.capacity, self.history, self.committed,
                                   self.priority, self.seq_lens]
        return arrays + [f.table for f in self.families] + [f.released for f in self.families]

    def remove(self, row: int) -> int | None:
        """Swap-remove ``row``; returns the handle whose row moved into it (or None)."""
        last = self.n - 1
        self.n = last
        if row == last:
            return None
        for arr in self._row_arrays():
            arr[row] = arr[last]
        self._log_rows(row)
        return int(self.handle[row])

    def remove_many(self, rows: I64) -> tuple[I64, I64]:
        """Remove distinct ``rows`` at once: the surviving rows past the new end move into the
        holes below it. Returns (handles that moved, their new rows)."""
        new_n = self.n - rows.size
        closing = np.zeros(self.n, np.bool_)
        closing[rows] = True
        holes = np.sort(rows[rows < new_n])
        movers = np.flatnonzero(~closing[new_n:]) + new_n
        for arr in self._row_arrays():
            arr[holes] = arr[movers]
        self.n = new_n
        for row in holes.tolist():
            self._log_rows(row)
        return self.handle[holes].copy(), holes

    def pages(self, row: int, layer_group: int) -> tuple[I64, I32]:
        """(block ordinals, slot ids) of the pages a row holds in one layer group."""
        t = self.tables[layer_group][row]
        ordinals = np.flatnonzero(t != NULL_SLOT)
        return ordinals, t[ordinals]

    def record(self, layer_group: int, rows: I64, cols: I64, slots: I32) -> None:
        if self.log is not None:
            self.log.append(TableChange(layer_group, rows, cols, np.asarray(slots, np.int32)))

    def _log_rows(self, row: int) -> None:
        """Log a whole row of every table (a row was added, or another moved into it)."""
        if self.log is None:
            return
        for g, table in enumerate(self.tables):
            cols = np.arange(table.shape[1], dtype=np.int64)
            self.record(g, np.full(cols.size, row, np.int64), cols, table[row].copy())

    def set_pages(self, row: int, layer_group: int, ordinals: I64, slots: I32, released: int) -> None:
        self.tables[layer_group][row, ordinals] = slots
        self.record(layer_group, np.full(ordinals.size, row, np.int64), ordinals, slots)
        self.released[layer_group][row] = released

    def slots_by_pool(self, rows: I64, num_pool_groups: int, tokens_per_block: int) -> list[I32]:
        """Every slot these rows hold, per pool group (one gather per family, up to the widest
        the rows' capacities span: nothing lies beyond)."""
        out: list[list[I32]] = [[] for _ in range(num_pool_groups)]
        longest = int(self.capacity[rows].max(initial=0))
        for f in self.families:
            t = f.table[rows, :f.life_cycle.width_at(longest, tokens_per_block)]
            out[f.pool_group].append(t[t != NULL_SLOT])
        return [np.concatenate(parts) if parts else np.zeros(0, np.int32) for parts in out]

    def all_slots(self, layer_group: int) -> I32:
        """Every slot the active rows hold in one layer group."""
        t = self.tables[layer_group][:self.n]
        out: I32 = t[t != NULL_SLOT]
        return out
