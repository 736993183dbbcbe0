"""What the manager's parts may see of it: a Protocol, so that the parts (moves, sharing,
prefix cache, stats, invariants) depend on this narrow face and not on ``KVCacheManager``
itself. Imports point down only: manager.py imports the parts, the parts import this.

Each part owns its own state (the cache table its handles and records, ``ActiveRows`` the
hot arrays, ``TierPools`` the allocators and buffers, the prefix cache its index and pins)
and reaches the others only through their public methods.
"""

from __future__ import annotations

from typing import Protocol

from hybridkv.core.types import CacheHandle, TierId
from hybridkv.layouts.grouping import GroupedLayout
from hybridkv.manager.cache_pins import PinnedPages
from hybridkv.manager.cache_table import CacheTable
from hybridkv.manager.counters import Counters
from hybridkv.manager.rows import ActiveRows
from hybridkv.manager.state import CacheLengths, RequestState
from hybridkv.manager.suspended import SuspendedCache
from hybridkv.manager.tiers import TierPools, Transfer
from hybridkv.manager.victims import VictimPolicy
from hybridkv.reuse import PrefixIndex


class PrefixRoom(Protocol):
    """What page moves and checks need of the prefix cache: the room its cache-only pages
    make on a tier, and giving them up."""

    @property
    def index(self) -> PrefixIndex: ...

    @property
    def pins_on(self) -> dict[TierId, PinnedPages]: ...

    def cached_room(self, tier: TierId, keep: list[bytes] | None = None) -> list[int]: ...

    def evict(self, deficit: list[int], keep: list[bytes] | None = None) -> list[int]: ...

    def drop_lower(self, tier: TierId, need: list[int], keep: list[bytes] | None = None) -> None: ...


class ManagerView(Protocol):
    """The manager as its parts see it."""

    moving: dict[int, Transfer]
    orphaned: list[Transfer]

    @property
    def grouped(self) -> GroupedLayout: ...

    @property
    def tokens_per_block(self) -> int: ...

    @property
    def max_seq_len(self) -> int: ...

    @property
    def rows(self) -> ActiveRows: ...

    @property
    def tiers(self) -> TierPools: ...

    @property
    def caches(self) -> CacheTable: ...

    @property
    def counters(self) -> Counters: ...

    @property
    def policy(self) -> VictimPolicy: ...

    @property
    def prefix(self) -> PrefixRoom | None: ...

    @property
    def suspended(self) -> dict[int, SuspendedCache]: ...

    def state(self, handle: CacheHandle) -> RequestState: ...

    def lengths(self, handle: CacheHandle) -> CacheLengths: ...

    def create(self, priority: int = 0) -> CacheHandle: ...

    def resume(self, handle: CacheHandle) -> bool: ...

    def make_room(self, need: list[int], exclude: int | None = None, keep: list[bytes] | None = None) -> bool: ...
