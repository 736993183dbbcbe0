"""Moving suspended caches between tiers, and freeing GPU slots when a step, resume, fork or
prefix open needs them: pages only the prefix cache holds count first, then suspended caches
move down a tier in the eviction policy's order (priority, then least recently used).

The whole plan is made before anything changes (``plan_room``), against the free slots of
every tier: when it cannot cover the deficit nothing changes. Applying it moves the planned
caches first, then the operation frees what it frees, and only then are cached pages taken
(``evict_cached``), offloaded into whatever host room the moves left: so no later part of the
operation consumes slots an earlier part planned on.

Moves to make room use only tiers whose transfers complete at once (``TierPools.immediate``):
the operation needs the GPU slots now, and a store to a slower tier frees them only when it
finishes. Such a tier is reached by an explicit ``offload`` and left by ``resume``; the move
is then in flight (``ManagerView.moving``) until a poll sees its jobs finish (``poll``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from hybridkv.core.types import GPU, TierId
from hybridkv.manager.suspended import SuspendedCache
from hybridkv.manager.tiers import Transfer
from hybridkv.manager.view import ManagerView


def pages_per_pool(m: ManagerView, cache: SuspendedCache) -> list[int]:
    """Pages per pool group the cache holds on its tier."""
    out = [0] * len(m.grouped.pool_groups)
    for lg in m.grouped.layer_groups:
        out[lg.pool_group] += int(cache.slots[lg.id].size)
    return out


def sole_pages_per_pool(m: ManagerView, cache: SuspendedCache) -> list[int]:
    """Pages per pool group that only this cache references (moving them frees GPU slots)."""
    out = [0] * len(m.grouped.pool_groups)
    for lg in m.grouped.layer_groups:
        refs = m.tiers.allocators[cache.tier][lg.pool_group].references(cache.slots[lg.id])
        out[lg.pool_group] += int((refs == 1).sum())
    return out


class RoomPlan(NamedTuple):
    """How an operation gets its GPU slots, decided before anything changes: the suspended
    caches to move down and the tier each goes to (planned against those tiers' free slots);
    the rest comes from pages only the prefix cache holds, taken after the operation's own
    frees (``evict_cached``), which may use only the host room the moves leave."""

    victims: list[tuple[SuspendedCache, TierId]]
    keep: list[bytes] | None = None  # keys of a match being served: their pages stay, on every tier


def plan_room(m: ManagerView, deficit: list[int], exclude: int | None = None, keep: list[bytes] | None = None,
              cache_only_after: list[int] | None = None) -> tuple[RoomPlan | None, list[int]]:
    """Plan to free ``deficit`` GPU slots per pool group: cache-only pages first (those now,
    except ``keep``'s, plus ``cache_only_after``: pages the operation's own frees leave to the
    cache alone), then suspended caches in policy order. Returns (the plan, or None when it
    cannot be done; the deficit left after the cache-only pages). Pure."""
    if all(d <= 0 for d in deficit):
        return RoomPlan([], keep), deficit
    cached = m.prefix.cached_room(GPU, keep) if m.prefix is not None else [0] * len(deficit)
    if cache_only_after is not None:
        cached = [c + a for c, a in zip(cached, cache_only_after, strict=True)]
    rest = [d - c for d, c in zip(deficit, cached, strict=True)]
    victims = plan_suspended(m, rest, exclude, keep)
    return (None if victims is None else RoomPlan(victims, keep)), rest


def apply_moves(m: ManagerView, room: RoomPlan) -> None:
    for victim, tier in room.victims:
        move_down(m, victim, tier, room.keep)
        m.counters.evictions += 1


def lower_room(m: ManagerView, tier: TierId, keep: list[bytes] | None = None) -> list[int]:
    """Slots per pool group a suspended cache moving down to ``tier`` may use: free ones, and
    those the prefix cache holds there for pages nobody uses (dropped to make the room),
    except the pages of ``keep`` (a match being served)."""
    free = m.tiers.free_slots(tier)
    if m.prefix is None:
        return free
    return [f + r for f, r in zip(free, m.prefix.cached_room(tier, keep), strict=True)]


def offload(m: ManagerView, cache: SuspendedCache, dst: TierId) -> bool:
    """Move a suspended cache down to ``dst`` if it has room there (cached pages nobody uses
    count); False (nothing changed) without room or while its pages are in flight."""
    if cache.handle in m.moving:
        return False
    if cache.tier == dst:
        return True
    room = lower_room(m, dst)
    if any(n > f for n, f in zip(pages_per_pool(m, cache), room, strict=True)):
        return False
    move_down(m, cache, dst)
    return True


def move_down(m: ManagerView, cache: SuspendedCache, dst: TierId, keep: list[bytes] | None = None) -> None:
    """Move a suspended cache to a lower tier, dropping cached pages there if it needs their
    room (the caller checked ``lower_room``)."""
    if m.prefix is not None:
        m.prefix.drop_lower(dst, pages_per_pool(m, cache), keep)
    move(m, cache, dst)


def evict_cached(m: ManagerView, need: list[int], keep: list[bytes] | None = None) -> None:
    """After the planned moves and the operation's frees: take cache-only pages until ``need``
    slots per pool group are free (the plan guaranteed there are enough)."""
    short = [n - f for n, f in zip(need, m.tiers.free_slots(GPU), strict=True)]
    if m.prefix is not None and any(s > 0 for s in short):
        m.prefix.evict(short, keep)


def make_room(m: ManagerView, need: list[int], exclude: int | None = None, keep: list[bytes] | None = None) -> bool:
    """Make ``need`` GPU slots per pool group free for an operation that frees nothing itself
    (resume, fork, prefix open). False and nothing changed when it cannot."""
    deficit = [n - f for n, f in zip(need, m.tiers.free_slots(GPU), strict=True)]
    room, _ = plan_room(m, deficit, exclude, keep)
    if room is None:
        return False
    apply_moves(m, room)
    evict_cached(m, need, keep)
    return True


def plan_suspended(m: ManagerView, deficit: list[int], exclude: int | None = None,
                   keep: list[bytes] | None = None) -> list[tuple[SuspendedCache, TierId]] | None:
    """Suspended GPU caches to move down (policy order) so their sole pages cover ``deficit``,
    each to the first local lower tier with room left by the ones before; None if they
    cannot. Caches in flight are not candidates (their pages are reserved by their jobs)."""
    if all(d <= 0 for d in deficit):
        return []
    lower = [t for t in m.tiers.lower if m.tiers.immediate[t]]
    free = {t: lower_room(m, t, keep) for t in lower}
    remaining, victims = list(deficit), []
    candidates = (c for c in m.suspended.values()
                  if c.tier == GPU and c.handle != exclude and c.handle not in m.moving)
    for cache in m.policy.order(candidates):
        pages = pages_per_pool(m, cache)
        freed = sole_pages_per_pool(m, cache)  # shared pages move as copies, freeing nothing
        if not any(r > 0 and p > 0 for r, p in zip(remaining, freed, strict=True)):
            continue
        dst = next((t for t in lower if all(p <= f for p, f in zip(pages, free[t], strict=True))), None)
        if dst is None:
            continue
        free[dst] = [f - p for f, p in zip(free[dst], pages, strict=True)]
        remaining = [r - p for r, p in zip(remaining, freed, strict=True)]
        victims.append((cache, dst))
        if all(r <= 0 for r in remaining):
            return victims
    return None


def _by_pool(m: ManagerView) -> list[list[int]]:
    """Layer groups of each pool group, in order: a cache's pages move as one array per pool."""
    per_pool: list[list[int]] = [[] for _ in m.grouped.pool_groups]
    for lg in m.grouped.layer_groups:
        per_pool[lg.pool_group].append(lg.id)
    return per_pool


def move(m: ManagerView, cache: SuspendedCache, dst: TierId) -> None:
    """Move all of a cache's pages to ``dst`` (room checked by the caller): now when both
    tiers are local, else as jobs that leave the cache in ``m.moving`` until they finish."""
    joined = [np.concatenate([cache.slots[g] for g in ids]) if ids else np.zeros(0, np.int32)
              for ids in _by_pool(m)]
    pages_bytes = sum(int(s.size) * b for s, b in zip(joined, m.tiers.slot_bytes, strict=True))
    if pages_bytes:  # an empty cache only changes its label
        m.counters.record_move(cache.tier, dst, pages_bytes)
    if m.tiers.immediate[cache.tier] and m.tiers.immediate[dst]:
        _land(m, cache, dst, m.tiers.move(cache.tier, dst, joined))
        return
    moving = m.tiers.submit(cache.tier, dst, joined)
    if moving.jobs:
        m.moving[cache.handle] = moving
        return
    m.tiers.finish(moving)
    _land(m, cache, dst, moving.dst_slots)


def _land(m: ManagerView, cache: SuspendedCache, dst: TierId, moved: list[npt.NDArray[np.int32]]) -> None:
    """Point the cache at its pages' new slots (one array per pool group) on ``dst``."""
    for ids, new in zip(_by_pool(m), moved, strict=True):
        offset = 0
        for g in ids:
            n = cache.slots[g].size
            cache.slots[g] = new[offset:offset + n]
            offset += n
    cache.tier = dst


def poll(m: ManagerView) -> int:
    """Finish the moves whose jobs all completed: free their sources, land their caches (or,
    for a cache closed while in flight, free the targets too). Never waits; returns how many
    moves finished."""
    m.tiers.poll()
    done = [h for h, t in m.moving.items() if not t.jobs]
    for h in done:
        moving = m.moving.pop(h)
        m.tiers.finish(moving)
        _land(m, m.suspended[h], moving.dst, moving.dst_slots)
    orphans = [t for t in m.orphaned if not t.jobs]
    for t in orphans:
        m.tiers.finish(t, keep_target=False)
    m.orphaned = [t for t in m.orphaned if t.jobs]
    return len(done) + len(orphans)


def orphan(m: ManagerView, handle: int) -> Transfer | None:
    """A cache closing while its pages are in flight: its move's slots stay reserved (the
    tier may still read the source and write the target) until a poll sees the jobs finish."""
    moving = m.moving.pop(handle, None)
    if moving is not None:
        m.orphaned.append(moving)
    return moving
