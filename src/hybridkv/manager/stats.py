"""Manager statistics: per pool group and tier occupancy, and movement counters."""

from __future__ import annotations

from dataclasses import dataclass, field

from hybridkv.core.types import GPU, TierId
from hybridkv.manager.counters import Counters
from hybridkv.manager.view import ManagerView


@dataclass(frozen=True, slots=True)
class PoolTierStats:
    """Occupancy of one pool group on one tier (slots)."""

    pool_group: int
    tier: TierId
    total: int
    free: int
    in_use: int
    evictable: int  # held by suspended caches (movable to a lower tier, or already there)
    peak_in_use: int  # since the last reset_peak


@dataclass(frozen=True)
class ManagerStats:
    pools: tuple[PoolTierStats, ...]
    counters: Counters
    active_requests: int
    suspended_requests: int
    extra: dict[str, int] = field(default_factory=dict)

    def pool(self, pool_group: int, tier: TierId = GPU) -> PoolTierStats:
        return next(p for p in self.pools if p.pool_group == pool_group and p.tier == tier)


def collect_stats(m: ManagerView, reset_peak: bool) -> ManagerStats:
    evictable = {(g, t): 0 for g in range(len(m.grouped.pool_groups)) for t in m.tiers.ids}
    for cache in m.suspended.values():
        for lg in m.grouped.layer_groups:
            evictable[(lg.pool_group, cache.tier)] += int(cache.slots[lg.id].size)
    pools = []
    for tier, allocators in zip(m.tiers.ids, m.tiers.allocators, strict=True):
        for g, a in enumerate(allocators):
            pools.append(PoolTierStats(g, tier, a.num_slots, a.num_free, a.num_in_use,
                                       evictable[(g, tier)], a.peak_in_use))
            if reset_peak:
                a.reset_peak()
    c = m.counters
    return ManagerStats(tuple(pools), Counters(**vars(c)), m.rows.n, len(m.suspended))
