"""check_invariants for the manager: every slot owned once, none leaked, tables exactly the
live blocks of each active request, lengths ordered, indexes consistent."""

from __future__ import annotations

import numpy as np

from hybridkv.core.errors import InvariantError
from hybridkv.core.types import GPU, TierId
from hybridkv.lifecycles import live_blocks
from hybridkv.manager.rows import NULL_SLOT
from hybridkv.manager.view import ManagerView


def _check_ownership(m: ManagerView) -> None:
    owned: dict[tuple[TierId, int], list[np.ndarray]] = {(t, g): [] for t in m.tiers.ids
                                                         for g in range(len(m.grouped.pool_groups))}
    _add_moves(m, owned)
    for lg in m.grouped.layer_groups:
        owned[(GPU, lg.pool_group)].append(m.rows.all_slots(lg.id))
        for cache in m.suspended.values():
            owned[(cache.tier, lg.pool_group)].append(cache.slots[lg.id])
    pinned: dict[tuple[TierId, int], list[int]] = {key: [] for key in owned}
    if m.prefix is not None:  # the prefix cache holds one reference (its pin) to every page it indexes
        m.prefix.index.check_invariants()
        for e in m.prefix.index.entries():
            pg = m.grouped.layer_groups[e.layer_group].pool_group
            owned[(e.tier, pg)].append(np.array([e.slot], np.int32))
            pinned[(e.tier, pg)].append(e.slot)
        for pins in m.prefix.pins_on.values():
            pins.check()
    for (tier, g), parts in owned.items():
        alloc = m.tiers.allocators[tier][g]
        alloc.check_invariants()
        slots = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        # every reference is a table entry or a suspended page: counts must match exactly
        held = np.bincount(slots, minlength=alloc.num_slots)
        refs = alloc.references(np.arange(alloc.num_slots))
        if not np.array_equal(held, refs):
            bad = int(np.flatnonzero(held != refs)[0])
            raise InvariantError(f"{m.tiers.names[tier]} pool group {g}: slot {bad} is referenced {int(refs[bad])} "
                                 f"times but held by {int(held[bad])} caches (leak or double owner)")
        flags = alloc.is_pinned(np.arange(alloc.num_slots))
        if not np.array_equal(np.flatnonzero(flags), np.sort(np.asarray(pinned[(tier, g)], np.int64))):
            raise InvariantError(f"{m.tiers.names[tier]} pool group {g}: pinned slots differ from the prefix "
                                 "cache's pages")


def _add_moves(m: ManagerView, owned: dict[tuple[TierId, int], list[np.ndarray]]) -> None:
    """Pages in flight: a move's targets are held by the move until its jobs finish; its
    sources by the cache (still pointing at them), or by the move once the cache closed."""
    jobs = [j for t in [*m.moving.values(), *m.orphaned] for j in t.jobs]
    if sorted(jobs) != sorted(m.tiers.in_flight) or len(set(jobs)) != len(jobs):
        raise InvariantError(f"jobs in flight {sorted(m.tiers.in_flight)[:8]} differ from the moves' "
                             f"{sorted(jobs)[:8]}")
    for h, t in m.moving.items():
        cache = m.suspended.get(h)
        if cache is None or cache.tier != t.src or not t.jobs:
            raise InvariantError(f"request {h}: a move in flight without a suspended cache on its source tier "
                                 "or without jobs (a finished move left unlanded)")
        for g, ids in enumerate(t.src_slots):
            mine = [cache.slots[lg.id] for lg in m.grouped.layer_groups if lg.pool_group == g]
            if not np.array_equal(np.concatenate([np.zeros(0, np.int32), *mine]), ids):
                raise InvariantError(f"request {h}: its pages differ from the sources of its move in flight")
    for t in m.orphaned:
        if not t.jobs:
            raise InvariantError("a closed cache's finished move still holds its slots")
        for g, ids in enumerate(t.src_slots):
            owned[(t.src, g)].append(ids)
    for t in [*m.moving.values(), *m.orphaned]:
        for g, ids in enumerate(t.dst_slots):
            owned[(t.dst, g)].append(ids)


def _check_rows(m: ManagerView) -> None:
    r, n, tpb = m.rows, m.rows.n, m.tokens_per_block
    cap, hist, com = r.capacity[:n], r.history[:n], r.committed[:n]
    if not ((com <= hist) & (hist <= cap) & (cap <= m.max_seq_len)).all():
        raise InvariantError("an active row breaks committed <= history <= capacity <= max_seq_len")
    if not (r.seq_lens[:n] == cap).all():
        raise InvariantError("seq_lens out of step with capacity")
    handles = r.handle[:n]
    m.caches.check_invariants(handles)
    for lg in m.grouped.layer_groups:
        table = r.tables[lg.id][:n]
        held = (table != NULL_SLOT).sum(axis=1)
        want = live_blocks(lg.life_cycle, cap, hist, tpb)
        if not (held == want).all():
            i = int(np.flatnonzero(held != want)[0])
            raise InvariantError(f"layer group {lg.id}, request {int(handles[i])}: holds {int(held[i])} pages, "
                                 f"live blocks are {int(want[i])}")
        stop = lg.life_cycle.stale_stop(hist, tpb)
        first = r.first_stale[lg.id]
        want_stop = np.full(n, first, np.int64) if stop is None else np.maximum(stop, first)
        if not (r.released[lg.id][:n] == want_stop).all():
            raise InvariantError(f"layer group {lg.id}: released stop differs from the stale stop")
        cols = np.arange(table.shape[1])
        beyond = cols[None, :] >= lg.life_cycle.blocks_spanned(cap, tpb)[:, None]
        if (table[beyond] != NULL_SLOT).any():
            raise InvariantError(f"layer group {lg.id}: a page beyond capacity")


def _check_suspended(m: ManagerView) -> None:
    for h, cache in m.suspended.items():
        for lg in m.grouped.layer_groups:
            want = int(live_blocks(lg.life_cycle, cache.capacity, cache.history, m.tokens_per_block))
            if cache.slots[lg.id].size != want or cache.ordinals[lg.id].size != want:
                raise InvariantError(f"request {h}, layer group {lg.id}: {cache.slots[lg.id].size} pages "
                                     f"suspended, live blocks are {want}")



def check(m: ManagerView) -> None:
    _check_ownership(m)
    _check_rows(m)
    _check_suspended(m)
