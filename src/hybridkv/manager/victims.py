"""Victim order for suspended caches: which to move down a tier when the GPU needs room
(the prefix cache orders its own cached pages: reuse/eviction.py).

Documented policy (``priority-lru``): lowest priority first, then least recently used
(the logical time the cache was suspended or last touched), then lowest handle. A cache moves
as a whole: all its pages in every pool group go to the same lower tier (host first, disk when
the host is full).
"""

from __future__ import annotations

from collections.abc import Iterable

from hybridkv.manager.suspended import SuspendedCache


class VictimPolicy:
    """Orders eviction candidates; subclasses override ``key``."""

    name = "base"

    def key(self, cache: SuspendedCache) -> tuple[int, ...]:
        raise NotImplementedError

    def order(self, candidates: Iterable[SuspendedCache]) -> list[SuspendedCache]:
        return sorted(candidates, key=self.key)


class SuspendedLRU(VictimPolicy):
    name = "priority-lru"

    def key(self, cache: SuspendedCache) -> tuple[int, ...]:
        return (cache.priority, cache.last_used, cache.handle)


POLICIES: dict[str, type[VictimPolicy]] = {SuspendedLRU.name: SuspendedLRU}
