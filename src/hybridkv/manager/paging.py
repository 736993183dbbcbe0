"""Vectorized page bookkeeping for one batched step: which table entries to free (stale
blocks, a shrunk tail, a state no longer needed) and which to fill with new slots.

Everything is NumPy over the batch; the per-request work is a handful of array operations per
layer group, and the variable-length ranges (a prefill chunk's new blocks) are expanded with
one ``repeat`` instead of a Python loop.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from hybridkv.layouts.grouping import GroupedLayout
from hybridkv.lifecycles.base import expand as expand_ranges
from hybridkv.manager.rows import NULL_SLOT, ActiveRows, Family
from hybridkv.storage.allocator import SlotAllocator

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
_EMPTY = np.zeros(0, np.int64)


class Coords(NamedTuple):
    """Block-table coordinates (row, block ordinal) of the entries one change touches."""

    rows: I64
    cols: I64


class Span(NamedTuple):
    """Per row, the block range ``[start, stop)`` that went stale this step (rows with none
    are left out). Kept as ranges, not expanded entries: after a long prefill a decode step
    releases most of every window table at once, and the ranges are freed with slices."""

    rows: I64
    start: I64
    stop: I64

    @property
    def num_blocks(self) -> int:
        return int((self.stop - self.start).sum())

    def coords(self) -> Coords:
        return expand(self.rows, self.start, self.stop - self.start)


class GroupDelta(NamedTuple):
    """One layer group's change: entries to free (a shrunk tail, an SSM state), entries to
    fill, and the stale ranges to release (which also set the rows' new stale stops)."""

    free: Coords
    grow: Coords
    stale: Span


def expand(rows: I64, start: I64, count: I64) -> Coords:
    """All (rows[i], start[i] + k) for k < count[i], in order; count may hold zeros."""
    return Coords(*expand_ranges(rows, start, count))


_NONE = Coords(_EMPTY, _EMPTY)
_NO_SPAN = Span(_EMPTY, _EMPTY, _EMPTY)


def _tail_changes(rows: I64, tot_old: I64, tot_new: I64) -> tuple[Coords, Coords]:
    """(grown, shrunk) block coordinates; the common decode step crosses no boundary."""
    change = tot_new - tot_old
    lo, hi = int(change.min(initial=0)), int(change.max(initial=0))
    grow = expand(rows, tot_old, change) if hi > 0 else _NONE
    shrink = expand(rows, tot_new, -change) if lo < 0 else _NONE
    return grow, shrink


def plan_step(grouped: GroupedLayout, state: ActiveRows, rows: I64, c_new: I64, h_new: I64) -> list[GroupDelta]:
    """Per family of layer groups (``ActiveRows.families``: one life cycle in one pool group),
    what moving ``rows`` to (c_new, h_new) frees and fills in each of its tables. Pure.

    Each life cycle says which ordinals a capacity spans and where its stale range ends;
    families whose kinds span alike (every token-holding kind) share one tail computation."""
    tpb = grouped.tokens_per_block
    c_old = state.capacity[rows]
    tails: dict[object, tuple[Coords, Coords]] = {}
    out = []
    for f in state.families:
        lc = f.life_cycle
        key = lc.span_key()
        if key not in tails:
            tails[key] = _tail_changes(rows, lc.blocks_spanned(c_old, tpb), lc.blocks_spanned(c_new, tpb))
        grow, shrink = tails[key]
        stop = lc.stale_stop(h_new, tpb)
        if stop is None:  # this kind never goes stale: only the tail moves
            out.append(GroupDelta(shrink, grow, _NO_SPAN))
            continue
        start = f.released[rows]
        gain = stop - start
        if int(gain.max(initial=0)) <= 0:  # no block went stale this step
            out.append(GroupDelta(shrink, grow, _NO_SPAN))
            continue
        moved = np.flatnonzero(gain > 0)  # stale blocks lie below the (new) tail: no overlap
        out.append(GroupDelta(shrink, grow, Span(rows[moved], start[moved], stop[moved])))
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
    for f, d in zip(state.families, deltas, strict=True):
        k, pg = len(f.members), f.pool_group
        fill[pg] += k * int(d.grow.rows.size)
        need[pg] += k * int(d.grow.rows.size)
        if not allocators[pg].shared:  # no page has two holders: every entry frees its page
            need[pg] -= k * (int(d.free.rows.size) + d.stale.num_blocks)
            continue
        for c in (d.free, d.stale.coords()):
            if c.rows.size:
                freed_slots[pg].append(f.table[c.rows, c.cols].ravel())
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
    for f, d in zip(state.families, deltas, strict=True):
        if d.free.rows.size:
            slots = f.table[d.free.rows, d.free.cols]  # [entries, members]
            per_pool[f.pool_group].append(slots.ravel())
            f.table[d.free.rows, d.free.cols] = NULL_SLOT
            _record(state, f, d.free.rows, d.free.cols)
        if d.stale.rows.size:
            per_pool[f.pool_group].append(_release_span(state, f, d.stale))
    for g, parts in enumerate(per_pool):
        if parts:
            allocators[g].free(np.concatenate(parts), distinct=True, trusted=True)


def _record(state: ActiveRows, f: Family, rows: I64, cols: I64, slots: I32 | None = None) -> None:
    """Log each member table's changed entries (``slots``: [entries, members]; None: NULL,
    built only when a mirror reads the log, never on the plain step)."""
    if state.log is not None:
        if slots is None:
            slots = np.full((rows.size, len(f.members)), NULL_SLOT, np.int32)
        for j, g in enumerate(f.members):
            state.record(g, rows, cols, slots[:, j])


def _release_span(state: ActiveRows, f: Family, span: Span) -> I32:
    """NULL the stale ranges of one family's tables; returns the slots they held. When the
    ranges fill most of the rectangle they span (the step after long prefills), a mask over
    that rectangle does it with a few contiguous passes (a slice view when the batch is the
    active rows in order); otherwise the entries are addressed one by one."""
    table = f.table
    lo, hi = int(span.start.min()), int(span.stop.max())
    n = span.rows.size
    if n * (hi - lo) > 2 * span.num_blocks:  # sparse: ordinary fancy indexing
        c = span.coords()
        slots: I32 = table[c.rows, c.cols]
        table[c.rows, c.cols] = NULL_SLOT
        _record(state, f, c.rows, c.cols)
        return slots.ravel()
    in_order = n == state.n and int(span.rows[0]) == 0 and bool((np.diff(span.rows) == 1).all())
    block = table[:n, lo:hi] if in_order else table[span.rows, lo:hi]
    if n * (hi - lo) == span.num_blocks:  # every row releases the same range: the whole rectangle
        mask = np.ones(block.shape[:2], np.bool_)
        slots = block.flatten()  # a copy, before the block is overwritten
        block[...] = NULL_SLOT
    else:
        cols = np.arange(lo, hi, dtype=np.int64)
        mask = (cols >= span.start[:, None]) & (cols < span.stop[:, None])
        slots = block[mask].ravel()
        block[mask] = NULL_SLOT
    if not in_order:
        table[span.rows, lo:hi] = block
    if state.log is not None:
        r, k = np.nonzero(mask)
        _record(state, f, span.rows[r], k + lo)
    return slots


def apply_grows(grouped: GroupedLayout, state: ActiveRows, deltas: list[GroupDelta],
                allocators: list[SlotAllocator]) -> None:
    """Fill the step's new entries (one allocation per family), then record stale stops. The
    caller made the room."""
    for f, d in zip(state.families, deltas, strict=True):
        if d.grow.rows.size:
            k = len(f.members)
            slots = allocators[f.pool_group].allocate(int(d.grow.rows.size) * k)
            if slots is None:
                raise AssertionError(f"pool group {f.pool_group}: slots vanished between check and apply")
            new = slots.reshape(-1, k)
            f.table[d.grow.rows, d.grow.cols] = new
            _record(state, f, d.grow.rows, d.grow.cols, new)
        if d.stale.rows.size:
            f.released[d.stale.rows] = d.stale.stop
