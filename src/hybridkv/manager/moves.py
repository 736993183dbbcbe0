"""Moving suspended caches between tiers, and freeing GPU slots when a step, resume or
fork needs them: pages only the prefix cache holds go first, then suspended caches move down
a tier in the eviction policy's order (priority, then least recently used). Every plan is
made in full before anything moves: when it cannot cover the deficit nothing changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hybridkv.manager.suspended import SuspendedCache
from hybridkv.types import Tier

if TYPE_CHECKING:
    from hybridkv.manager.manager import KVCacheManager


def pages_per_pool(m: KVCacheManager, cache: SuspendedCache) -> list[int]:
    """Pages per pool group the cache holds on its tier."""
    out = [0] * len(m.grouped.pool_groups)
    for lg in m.grouped.layer_groups:
        out[lg.pool_group] += int(cache.slots[lg.id].size)
    return out


def sole_pages_per_pool(m: KVCacheManager, cache: SuspendedCache) -> list[int]:
    """Pages per pool group that only this cache references (moving them frees GPU slots)."""
    out = [0] * len(m.grouped.pool_groups)
    for lg in m.grouped.layer_groups:
        refs = m.tiers.allocators[cache.tier][lg.pool_group].references(cache.slots[lg.id])
        out[lg.pool_group] += int((refs == 1).sum())
    return out


def evict(m: KVCacheManager, deficit: list[int], exclude: int | None = None,
          keep: list[bytes] | None = None) -> bool:
    """Free GPU slots: first pages only the prefix cache holds (except ``keep`` keys), then
    by moving suspended caches down a tier (policy order). Plans the whole set first: False
    and nothing moved if it cannot cover ``deficit``."""
    if all(d <= 0 for d in deficit):
        return True
    if m.prefix is not None:
        cached = m.prefix.evict(deficit, keep, apply=False)
        if all(c >= d for c, d in zip(cached, deficit, strict=True)):
            m.prefix.evict(deficit, keep)
            return True
        rest = [d - c for d, c in zip(deficit, cached, strict=True)]
        if not evict_suspended(m, rest, exclude, apply=False):
            return False
        m.prefix.evict(deficit, keep)
        deficit = rest
    return evict_suspended(m, deficit, exclude)


def evict_suspended(m: KVCacheManager, deficit: list[int], exclude: int | None = None, apply: bool = True) -> bool:
    if all(d <= 0 for d in deficit):
        return True
    free = {t: m.tiers.free_slots(t) for t in (Tier.HOST, Tier.DISK)}
    remaining, victims = list(deficit), []
    candidates = (c for c in m.suspended.values() if c.tier is Tier.GPU and c.handle != exclude)
    for cache in m.policy.order(candidates):
        pages = pages_per_pool(m, cache)
        freed = sole_pages_per_pool(m, cache)  # shared pages move as copies, freeing nothing
        if not any(r > 0 and p > 0 for r, p in zip(remaining, freed, strict=True)):
            continue
        dst = next((t for t in (Tier.HOST, Tier.DISK)
                    if all(p <= f for p, f in zip(pages, free[t], strict=True))), None)
        if dst is None:
            continue
        free[dst] = [f - p for f, p in zip(free[dst], pages, strict=True)]
        remaining = [r - p for r, p in zip(remaining, freed, strict=True)]
        victims.append((cache, dst))
        if all(r <= 0 for r in remaining):
            if not apply:
                return True
            for victim, tier in victims:
                move(m, victim, tier)
                m.counters.evictions += 1
            return True
    return False


def move(m: KVCacheManager, cache: SuspendedCache, dst: Tier) -> None:
    """Move all of a cache's pages to ``dst`` (room checked by the caller)."""
    lgs = m.grouped.layer_groups
    per_pool: list[list[int]] = [[] for _ in m.grouped.pool_groups]
    for lg in lgs:
        per_pool[lg.pool_group].append(lg.id)
    joined = [np.concatenate([cache.slots[g] for g in ids]) if ids else np.zeros(0, np.int32)
              for ids in per_pool]
    moved = m.tiers.move(cache.tier, dst, joined)
    for ids, new in zip(per_pool, moved, strict=True):
        offset = 0
        for g in ids:
            n = cache.slots[g].size
            cache.slots[g] = new[offset:offset + n]
            offset += n
    pages_bytes = sum(int(s.size) * b for s, b in zip(joined, m.tiers.slot_bytes, strict=True))
    if pages_bytes:  # an empty cache only changes its label
        m.counters.record_move(cache.tier, dst, pages_bytes)
    cache.tier = dst
