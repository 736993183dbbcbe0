"""A suspended request's cache: its lengths and its pages, all on one tier (cold path)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from hybridkv.core.types import GPU, TierId


@dataclass(slots=True)
class SuspendedCache:
    """Pages per layer group (block ordinals and slot ids on ``tier``) plus the lengths.

    ``released`` per layer group is the stale stop at suspension, so resume restores it.
    """

    handle: int
    capacity: int
    history: int
    committed: int
    priority: int
    last_used: int
    tier: TierId
    ordinals: list[npt.NDArray[np.int64]]
    slots: list[npt.NDArray[np.int32]]
    released: list[int]

    def num_pages(self, layer_groups: list[int] | None = None) -> int:
        groups = range(len(self.slots)) if layer_groups is None else layer_groups
        return sum(int(self.slots[g].size) for g in groups)

    @staticmethod
    def empty(handle: int, first_stale: list[int], priority: int, clock: int) -> SuspendedCache:
        """No pages yet; ``first_stale`` per layer group is where stale ranges start (after the
        sink blocks)."""
        num_layer_groups = len(first_stale)
        return SuspendedCache(
            handle, 0, 0, 0, priority, clock, GPU,
            [np.zeros(0, np.int64) for _ in range(num_layer_groups)],
            [np.zeros(0, np.int32) for _ in range(num_layer_groups)],
            list(first_stale),
        )
