"""Vectorized page bookkeeping for one batched step: which table entries to free (stale window
blocks, a shrunk tail, an SSM state no longer needed) and which to fill with new slots.

Everything is NumPy over the batch; the per-request work is a handful of array operations per
layer group, and the variable-length ranges (a prefill chunk's new blocks) are expanded with
one ``repeat`` instead of a Python loop.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from hybridkv.grouping import GroupedLayout
from hybridkv.lifecycle import keep_start
from hybridkv.manager.rows import NULL_SLOT, ActiveRows
from hybridkv.storage.allocator import SlotAllocator

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
_EMPTY = np.zeros(0, np.int64)


class Coords(NamedTuple):
    """Block-table coordinates (row, block ordinal) of the entries one change touches."""

    rows: I64
    cols: I64


class GroupDelta(NamedTuple):
    """One layer group's change: entries to free, entries to fill, new stale stops."""

    free: Coords
    grow: Coords
    released_rows: I64
    released_stop: I64


def expand(rows: I64, start: I64, count: I64) -> Coords:
    """All (rows[i], start[i] + k) for k < count[i], in order; count may hold zeros."""
    idx = np.flatnonzero(count > 0)
    if idx.size == 0:
        return Coords(_EMPTY, _EMPTY)
    cnt, r, s = count[idx], rows[idx], start[idx]
    if int(cnt.max()) == 1:
        return Coords(r, s)
    offsets = np.arange(int(cnt.sum()), dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    return Coords(np.repeat(r, cnt), np.repeat(s, cnt) + offsets)


_NONE = Coords(_EMPTY, _EMPTY)


def _tail_changes(rows: I64, tot_old: I64, tot_new: I64) -> tuple[Coords, Coords]:
    """(grown, shrunk) block coordinates; the common decode step crosses no boundary."""
    change = tot_new - tot_old
    lo, hi = int(change.min(initial=0)), int(change.max(initial=0))
    grow = expand(rows, tot_old, change) if hi > 0 else _NONE
    shrink = expand(rows, tot_new, -change) if lo < 0 else _NONE
    return grow, shrink


def _ssm_changes(rows: I64, c_old: I64, c_new: I64) -> tuple[Coords, Coords]:
    """(new state slots, freed state slots): a state exists while capacity > 0."""
    has_old, has_new = c_old > 0, c_new > 0
    born, gone = rows[has_new & ~has_old], rows[has_old & ~has_new]
    return Coords(born, np.zeros_like(born)), Coords(gone, np.zeros_like(gone))


def plan_step(grouped: GroupedLayout, state: ActiveRows, rows: I64, c_new: I64, h_new: I64) -> list[GroupDelta]:
    """Per layer group, what moving ``rows`` to (c_new, h_new) frees and fills. Pure."""
    tpb = grouped.tokens_per_block
    c_old = state.capacity[rows]
    grow_all, shrink_all = _tail_changes(rows, -(-c_old // tpb), -(-c_new // tpb))
    ssm = _ssm_changes(rows, c_old, c_new) if state.has_ssm else (_NONE, _NONE)
    out = []
    for g, lg in enumerate(grouped.layer_groups):
        lc = lg.life_cycle
        rel = state.released[g]
        if lc.is_ssm:
            out.append(GroupDelta(ssm[1], ssm[0], _EMPTY, _EMPTY))
            continue
        if rel is None:  # full attention: only the tail moves
            out.append(GroupDelta(shrink_all, grow_all, _EMPTY, _EMPTY))
            continue
        stop = keep_start(lc, h_new) // tpb
        gain = stop - rel[rows]
        if int(gain.max(initial=0)) <= 0:  # no block went stale this step
            out.append(GroupDelta(shrink_all, grow_all, _EMPTY, _EMPTY))
            continue
        stale = expand(rows, rel[rows], gain)
        moved = np.flatnonzero(gain > 0)
        free = stale if shrink_all.rows.size == 0 else Coords(
            np.concatenate([stale.rows, shrink_all.rows]), np.concatenate([stale.cols, shrink_all.cols]))
        out.append(GroupDelta(free, grow_all, rows[moved], stop[moved]))
    return out


class SlotNeed(NamedTuple):
    """Per pool group, exactly what a step's page changes do to the free count: ``need`` =
    slots it fills minus slots its frees return to the pool (may be negative), and
    ``cache_only`` = pages its frees leave held by the prefix cache alone (reclaimable once
    the frees are applied: the room a window release makes when the cache pins the page),
    ``fill`` = slots it fills."""

    need: list[int]
    cache_only: list[int]
    fill: list[int]


def net_slots(grouped: GroupedLayout, state: ActiveRows, deltas: list[GroupDelta],
              allocators: list[SlotAllocator]) -> SlotNeed:
    """Exact ``SlotNeed`` of a step. A page several caches share returns to the pool only when
    the step drops every reference but the pin, so frees are counted per distinct page with
    their multiplicity (two caches releasing one shared page in one step free it)."""
    n = len(grouped.pool_groups)
    fill, cache_only = [0] * n, [0] * n
    freed_slots: list[list[I32]] = [[] for _ in range(n)]
    need = [0] * n
    for lg, d in zip(grouped.layer_groups, deltas, strict=True):
        fill[lg.pool_group] += int(d.grow.rows.size)
        need[lg.pool_group] += int(d.grow.rows.size)
        if not allocators[lg.pool_group].shared:  # no page has two holders: every entry frees its page
            need[lg.pool_group] -= int(d.free.rows.size)
        elif d.free.rows.size:
            freed_slots[lg.pool_group].append(state.tables[lg.id][d.free.rows, d.free.cols])
    for g, parts in enumerate(freed_slots):
        if not parts:
            continue
        slots, alloc = np.concatenate(parts), allocators[g]
        uniq, counts = np.unique(slots, return_counts=True)
        refs = alloc.references(uniq)
        need[g] -= int((refs == counts).sum())
        cache_only[g] = int((alloc.is_pinned(uniq) & (refs == counts + 1)).sum())
    return SlotNeed(need, cache_only, fill)


def apply_frees(grouped: GroupedLayout, state: ActiveRows, deltas: list[GroupDelta],
                allocators: list[SlotAllocator]) -> None:
    """Drop the step's stale and shrunk entries (one free per pool group: repeats counted)."""
    per_pool: list[list[I32]] = [[] for _ in grouped.pool_groups]
    for lg, d in zip(grouped.layer_groups, deltas, strict=True):
        if d.free.rows.size:
            table = state.tables[lg.id]
            per_pool[lg.pool_group].append(table[d.free.rows, d.free.cols])
            table[d.free.rows, d.free.cols] = NULL_SLOT
            state.record(lg.id, d.free.rows, d.free.cols, np.full(d.free.rows.size, NULL_SLOT, np.int32))
    for g, parts in enumerate(per_pool):
        if parts:
            allocators[g].free(np.concatenate(parts), distinct=True)


def apply_grows(grouped: GroupedLayout, state: ActiveRows, deltas: list[GroupDelta],
                allocators: list[SlotAllocator]) -> None:
    """Fill the step's new entries, then record stale stops. The caller made the room."""
    for lg, d in zip(grouped.layer_groups, deltas, strict=True):
        if d.grow.rows.size:
            slots = allocators[lg.pool_group].allocate(int(d.grow.rows.size))
            if slots is None:
                raise AssertionError(f"pool group {lg.pool_group}: slots vanished between check and apply")
            state.tables[lg.id][d.grow.rows, d.grow.cols] = slots
            state.record(lg.id, d.grow.rows, d.grow.cols, slots)
        rel = state.released[lg.id]
        if rel is not None and d.released_rows.size:
            rel[d.released_rows] = d.released_stop
