"""Slot allocators and pool buffers for every pool group on every tier, and page moves.

GPU slot counts come from the plan, host slots from the plan's host quota, disk slots from
``StorageConfig.disk_bytes`` split with the same byte shares as the GPU. With
``with_data=False`` no buffers are allocated (bookkeeping only: benchmarks, the simulator).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError
from hybridkv.core.types import Tier
from hybridkv.planning.planner import PoolPlan
from hybridkv.storage.allocator import SlotAllocator
from hybridkv.storage.backends import PoolBuffer, make_buffer
from hybridkv.storage.copy import CopyEngine, HostCopyEngine

I32 = npt.NDArray[np.int32]


@dataclass(frozen=True)
class StorageConfig:
    """Where each tier's bytes live. Backends: "numpy", "disk", "torch" (options: device,
    pin_memory). The disk tier always uses "disk" (memmap files in ``disk_directory``)."""

    gpu_backend: str = "numpy"
    gpu_options: dict[str, Any] = field(default_factory=dict)
    host_backend: str = "numpy"
    host_options: dict[str, Any] = field(default_factory=dict)
    disk_bytes: int = 0
    disk_directory: str | None = None
    with_data: bool = True
    copy_engine: CopyEngine | None = None

    def __post_init__(self) -> None:
        if self.disk_bytes < 0:
            raise ConfigError(f"disk_bytes must be >= 0, got {self.disk_bytes}")


class TierPools:
    """allocators[tier][pool_group] and buffers[tier][pool_group] (None without data)."""

    def __init__(self, plan: PoolPlan, storage: StorageConfig) -> None:
        used = plan.gpu_bytes_used
        counts = {
            Tier.GPU: [pg.slots for pg in plan.pool_groups],
            Tier.HOST: [pg.host_slots for pg in plan.pool_groups],
            Tier.DISK: [storage.disk_bytes * pg.slots // used if used else 0 for pg in plan.pool_groups],
        }
        backend = {Tier.GPU: (storage.gpu_backend, storage.gpu_options),
                   Tier.HOST: (storage.host_backend, storage.host_options),
                   Tier.DISK: ("disk", {"directory": storage.disk_directory})}
        self.slot_bytes = [pg.slot_bytes for pg in plan.pool_groups]
        self.allocators: dict[Tier, list[SlotAllocator]] = {}
        self.buffers: dict[Tier, list[PoolBuffer | None]] = {}
        for tier, per_group in counts.items():
            kind, options = backend[tier]
            self.allocators[tier] = [SlotAllocator(n, f"{tier.name} pool group {g}")
                                     for g, n in enumerate(per_group)]
            self.buffers[tier] = [
                make_buffer(kind, n, self.slot_bytes[g], **options) if storage.with_data and n else None
                for g, n in enumerate(per_group)
            ]
        self.copy_engine: CopyEngine = storage.copy_engine or HostCopyEngine()
        self.bytes_moved = {(a, b): 0 for a in Tier for b in Tier}

    def free_slots(self, tier: Tier) -> list[int]:
        return [a.num_free for a in self.allocators[tier]]

    def move(self, src: Tier, dst: Tier, slots: list[I32]) -> list[I32]:
        """Move pages (per pool group) from ``src`` to ``dst``: allocate, copy, free the source.
        The caller has checked that ``dst`` has room; returns the new slot ids.

        With an asynchronous (CUDA) copy engine: before the GPU source slots go back to the
        allocator the host waits for the copies (a new owner's kernels could otherwise overwrite
        them mid-copy; queued GPU compute keeps running); pages arriving on the GPU make the
        compute stream wait for their copies, the host does not."""
        out, freed = [], []
        for g, ids in enumerate(slots):
            if ids.size == 0:
                out.append(ids)
                continue
            new = self.allocators[dst][g].allocate(ids.size)
            if new is None:
                raise AssertionError(f"{dst.name} pool group {g}: move without room (caller bug)")
            sb, db = self.buffers[src][g], self.buffers[dst][g]
            if sb is not None and db is not None:
                self.copy_engine.copy(sb, ids, db, new)
            freed.append((g, ids))
            self.bytes_moved[(src, dst)] += int(ids.size) * self.slot_bytes[g]
            out.append(new)
        if src is Tier.GPU:
            self.copy_engine.synchronize()
        if dst is Tier.GPU:
            self.copy_engine.wait_for_copies()
        for g, ids in freed:
            self.allocators[src][g].free(ids)
        return out

    def close(self) -> None:
        for bufs in self.buffers.values():
            for b in bufs:
                if b is not None:
                    b.close()
