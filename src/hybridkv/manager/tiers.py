"""The tiers as data: slot allocators and pool buffers for every pool group on every tier,
and the transfers that move pages between them.

Tier 0 is the GPU (slot counts from the plan); tiers 1..n are ``StorageConfig.lower_tiers``
in order: suspended caches go down that list and come back up. A lower tier's ``bytes`` are
split between pool groups with the GPU's byte shares; ``None`` (first tier only) takes the
plan's host share (``PlanSpec.host_bytes``). Backends come from the registry
(storage/backends.py). With ``with_data=False`` no buffers are allocated (bookkeeping only:
benchmarks, the simulator) and every move completes at once.

Two ways to move pages: ``move`` copies now (both tiers local: the common case, and the only
one the prefix cache and in-step eviction use), ``submit`` starts jobs on a tier that may
finish them later (storage/jobs.py) and ``poll`` / ``finish`` complete them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError, UsageError
from hybridkv.core.types import DEFAULT_TIER_NAMES, GPU, TierId
from hybridkv.planning.planner import PoolPlan
from hybridkv.storage.allocator import SlotAllocator
from hybridkv.storage.backends import PoolBuffer, check_backend, make_buffer
from hybridkv.storage.copy import CopyEngine, HostCopyEngine
from hybridkv.storage.jobs import AsyncTier, JobId, LocalTier, is_async

I32 = npt.NDArray[np.int32]


@dataclass(frozen=True)
class TierSpec:
    """One lower tier: its name (stats, KV events, errors), a registered backend, its bytes
    (None: the plan's host share, first lower tier only) and the backend's options."""

    name: str
    backend: str = "numpy"
    bytes: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a lower tier needs a name (TierSpec.name)")
        if self.bytes is not None and self.bytes < 0:
            raise ConfigError(f"lower tier {self.name!r}: bytes must be >= 0, got {self.bytes}")


def local_tiers(disk_bytes: int = 0, disk_directory: str | None = None, host_backend: str = "numpy",
                host_options: Mapping[str, Any] | None = None) -> tuple[TierSpec, ...]:
    """The default list: host memory (the plan's host share), then memmap files on disk."""
    host, disk = DEFAULT_TIER_NAMES[1:]
    return (TierSpec(host, host_backend, None, dict(host_options or {})),
            TierSpec(disk, "disk", disk_bytes, {"directory": disk_directory}))


@dataclass(frozen=True)
class StorageConfig:
    """Where each tier's bytes live: the GPU's backend and options, then the lower tiers in
    order (``TierSpec``). ``StorageConfig.local(...)`` spells the common case in one line."""

    gpu_backend: str = "numpy"
    gpu_options: dict[str, Any] = field(default_factory=dict)
    lower_tiers: tuple[TierSpec, ...] = field(default_factory=local_tiers)
    with_data: bool = True
    copy_engine: CopyEngine | None = None

    def __post_init__(self) -> None:
        check_backend(self.gpu_backend, "StorageConfig.gpu_backend")
        names = [DEFAULT_TIER_NAMES[0]]
        for i, t in enumerate(self.lower_tiers):
            check_backend(t.backend, f"StorageConfig.lower_tiers[{i}].backend ({t.name!r})")
            if t.name in names:
                raise ConfigError(f"StorageConfig.lower_tiers[{i}]: tier name {t.name!r} is used twice "
                                  f"(names: {names})")
            if t.bytes is None and i > 0:
                raise ConfigError(f"StorageConfig.lower_tiers[{i}] ({t.name!r}): only the first lower tier "
                                  "takes the plan's host share (bytes=None); give its bytes")
            names.append(t.name)

    @classmethod
    def local(cls, *, disk_bytes: int = 0, disk_directory: str | None = None, host_backend: str = "numpy",
              host_options: Mapping[str, Any] | None = None, **rest: Any) -> StorageConfig:
        """The host tier (the plan's host share, on ``host_backend``) and a disk tier of
        ``disk_bytes`` in ``disk_directory``; ``rest``: the other fields."""
        return cls(lower_tiers=local_tiers(disk_bytes, disk_directory, host_backend, host_options), **rest)


@dataclass(slots=True)
class Transfer:
    """Pages in flight between two tiers, per pool group: the source slots stay reserved (a
    tier may still read them), the target slots are allocated (it may still write them) until
    every job finished; ``TierPools.finish`` then frees the source."""

    src: TierId
    dst: TierId
    src_slots: list[I32]
    dst_slots: list[I32]
    jobs: set[JobId]


class TierPools:
    """Per tier (index = ``TierId``): its name, allocators and buffers per pool group (None
    without data), whether its transfers complete at once; the copy engine; jobs in flight."""

    def __init__(self, plan: PoolPlan, storage: StorageConfig) -> None:
        self.names = [DEFAULT_TIER_NAMES[0], *(t.name for t in storage.lower_tiers)]
        self.slot_bytes = [pg.slot_bytes for pg in plan.pool_groups]
        counts = [[pg.slots for pg in plan.pool_groups]] + [_lower_slots(plan, t) for t in storage.lower_tiers]
        backends = [(storage.gpu_backend, storage.gpu_options)] + [(t.backend, t.options)
                                                                   for t in storage.lower_tiers]
        self.allocators: list[list[SlotAllocator]] = []
        self.buffers: list[list[PoolBuffer | None]] = []
        for name, per_group, (kind, options) in zip(self.names, counts, backends, strict=True):
            self.allocators.append([SlotAllocator(n, f"{name} pool group {g}") for g, n in enumerate(per_group)])
            self.buffers.append([make_buffer(kind, n, self.slot_bytes[g], **options)
                                 if storage.with_data and n else None for g, n in enumerate(per_group)])
        self.copy_engine: CopyEngine = storage.copy_engine or HostCopyEngine()
        self.immediate = [not any(is_async(b) for b in bufs) for bufs in self.buffers]
        self.lower = [TierId(t) for t in range(1, len(self.names))]
        self.bytes_moved = {(TierId(a), TierId(b)): 0 for a in range(len(self.names)) for b in range(len(self.names))}
        self.in_flight: dict[JobId, Transfer] = {}
        self._next_job = 0

    @property
    def ids(self) -> list[TierId]:
        return [GPU, *self.lower]

    def tier_id(self, name: str) -> TierId:
        """The id of the tier called ``name`` (UsageError listing the names)."""
        if name not in self.names:
            raise UsageError(f"no tier named {name!r}; tiers: {', '.join(self.names)}")
        return TierId(self.names.index(name))

    def free_slots(self, tier: TierId) -> list[int]:
        return [a.num_free for a in self.allocators[tier]]

    def copy_to_fresh(self, pool_group: int, src: I32 | npt.NDArray[np.int64]) -> I32:
        """Fresh GPU slots holding copies of the GPU pages ``src`` (a fork's partial block, a
        state's snapshot); the caller checked the room and waits for the copies."""
        fresh = self.allocators[GPU][pool_group].allocate(int(src.size))
        if fresh is None:
            raise AssertionError(f"pool group {pool_group}: copy without room (caller bug)")
        buf = self.buffers[GPU][pool_group]
        if buf is not None:
            self.copy_engine.copy(buf, src.astype(np.int32), buf, fresh)
        return fresh

    def move(self, src: TierId, dst: TierId, slots: list[I32]) -> list[I32]:
        """Move pages (per pool group) between two local tiers now: allocate, copy, free the
        source. The caller has checked that ``dst`` has room; returns the new slot ids.

        With an asynchronous (CUDA) copy engine: before the GPU source slots go back to the
        allocator the host waits for the copies (a new owner's kernels could otherwise overwrite
        them mid-copy; queued GPU compute keeps running); pages arriving on the GPU make the
        compute stream wait for their copies, the host does not."""
        out, freed = [], []
        for g, ids in enumerate(slots):
            new = self._allocate(dst, g, ids, src)
            sb, db = self.buffers[src][g], self.buffers[dst][g]
            if ids.size and sb is not None and db is not None:
                self.copy_engine.copy(sb, ids, db, new)
            freed.append((g, ids))
            out.append(new)
        if src == GPU:
            self.copy_engine.synchronize()
        if dst == GPU:
            self.copy_engine.wait_for_copies()
        for g, ids in freed:
            if ids.size:
                self.allocators[src][g].free(ids)
        return out

    def _allocate(self, dst: TierId, g: int, ids: I32, src: TierId) -> I32:
        if ids.size == 0:
            return ids
        new = self.allocators[dst][g].allocate(ids.size)
        if new is None:
            raise AssertionError(f"{self.names[dst]} pool group {g}: move without room (caller bug)")
        self.bytes_moved[(src, dst)] += int(ids.size) * self.slot_bytes[g]
        return new

    def submit(self, src: TierId, dst: TierId, slots: list[I32]) -> Transfer:
        """Start moving pages (per pool group) from ``src`` to ``dst``: allocate the targets
        and hand one job per pool group to the lower tier that may be slow (the target when it
        is, else the source). Nothing is freed here; a transfer whose jobs all completed inside
        the call comes back with no jobs, and the caller ``finish``es it at once."""
        new = [self._allocate(dst, g, ids, src) for g, ids in enumerate(slots)]
        moving = Transfer(src, dst, slots, new, set())
        remote = dst if dst != GPU and not self.immediate[dst] else src
        for g, (ids, to) in enumerate(zip(slots, new, strict=True)):
            sb, db = self.buffers[src][g], self.buffers[dst][g]
            if ids.size == 0 or sb is None or db is None:
                continue
            job = JobId(self._next_job)
            self._next_job += 1
            done = (self._channel(remote, g).store(job, sb, ids, to) if remote == dst
                    else self._channel(remote, g).load(job, ids, db, to))
            if not done:
                moving.jobs.add(job)
                self.in_flight[job] = moving
        return moving

    def _channel(self, tier: TierId, g: int) -> AsyncTier:
        buf = self.buffers[tier][g]
        assert buf is not None  # submit skips pool groups without buffers
        return buf if isinstance(buf, AsyncTier) else LocalTier(buf, self.copy_engine)

    def poll(self) -> None:
        """Ask every tier that may be slow which jobs finished; they leave their transfers'
        ``jobs``. Never waits."""
        for tier in self.lower:
            if not self.immediate[tier]:
                for buf in self.buffers[tier]:
                    if isinstance(buf, AsyncTier):
                        for job in buf.finished():
                            self.in_flight.pop(job).jobs.discard(job)

    def finish(self, moving: Transfer, keep_target: bool = True) -> None:
        """Free a finished transfer's source slots (and its targets too when nobody wants
        them any more: the cache closed while its pages were in flight)."""
        if moving.jobs:
            raise AssertionError(f"finish with {len(moving.jobs)} jobs in flight (caller bug)")
        for g, (ids, new) in enumerate(zip(moving.src_slots, moving.dst_slots, strict=True)):
            if ids.size:
                self.allocators[moving.src][g].free(ids)
            if new.size and not keep_target:
                self.allocators[moving.dst][g].free(new)

    def close(self) -> None:
        for bufs in self.buffers:
            for b in bufs:
                if b is not None:
                    b.close()


def _lower_slots(plan: PoolPlan, tier: TierSpec) -> list[int]:
    """Slots per pool group of a lower tier: the plan's host share, or ``bytes`` split with
    the GPU's byte shares."""
    if tier.bytes is None:
        return [pg.host_slots for pg in plan.pool_groups]
    used = plan.gpu_bytes_used
    return [tier.bytes * pg.slots // used if used else 0 for pg in plan.pool_groups]
