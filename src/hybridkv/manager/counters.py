"""Monotone counters a manager keeps since it was built (what stats report as movement)."""

from __future__ import annotations

from dataclasses import dataclass

from hybridkv.core.types import TierId


@dataclass
class Counters:
    """Monotone counters since the manager was built."""

    steps: int = 0
    suspends: int = 0
    resumes: int = 0
    evictions: int = 0  # suspended caches moved down because the GPU needed room
    offloads: int = 0  # caches moved to a lower tier (evictions and explicit offloads)
    onboards: int = 0  # caches moved to a higher tier (resume from host / disk)
    offload_bytes: int = 0
    onboard_bytes: int = 0
    forks: int = 0  # caches created sharing another's prefix

    def record_move(self, src: TierId, dst: TierId, nbytes: int) -> None:
        if dst > src:
            self.offloads += 1
            self.offload_bytes += nbytes
        else:
            self.onboards += 1
            self.onboard_bytes += nbytes
