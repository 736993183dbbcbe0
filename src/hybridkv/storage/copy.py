"""The copy engine: moves whole slots between pool buffers (tiers).

``HostCopyEngine`` covers NumPy and memmap buffers directly (one fancy-indexed memcpy, or one
slice copy per contiguous run when the runs are long) and any other pair of buffers through
their ``read``/``write``. The torch backend brings its own engine for device copies.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import UsageError
from hybridkv.storage.backends import NumpyBuffer, PoolBuffer

SlotArray = npt.NDArray[np.int32]

MIN_RUN_SLOTS = 8  # below this average run length one gather beats many slice copies


class CopyEngine(Protocol):
    def copy(self, src: PoolBuffer, src_slots: SlotArray, dst: PoolBuffer, dst_slots: SlotArray) -> None:
        """Copy slot ``src_slots[i]`` of ``src`` into ``dst_slots[i]`` of ``dst`` for every i."""

    def synchronize(self) -> None:
        """Wait (the host) until every copy issued so far is complete."""

    def wait_for_copies(self) -> None:
        """Make later work on the caller's compute stream wait for every copy issued so far
        (the host does not wait). Synchronous engines: nothing to do."""


def contiguous_runs(src: SlotArray, dst: SlotArray) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) runs where both sides advance by one slot together."""
    if src.size == 0:
        return []
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [src.size]])
    return [(int(src[s]), int(dst[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def check_copy_args(src: PoolBuffer, src_slots: SlotArray, dst: PoolBuffer, dst_slots: SlotArray) -> None:
    if src.slot_bytes != dst.slot_bytes:
        raise UsageError(f"copy between pools of different slot sizes: {src.slot_bytes} B "
                         f"and {dst.slot_bytes} B")
    if src_slots.shape != dst_slots.shape:
        raise UsageError(f"copy of {src_slots.size} source slots into {dst_slots.size} targets")


class HostCopyEngine:
    """Synchronous copies in host memory (NumPy arrays and memmaps)."""

    def copy(self, src: PoolBuffer, src_slots: SlotArray, dst: PoolBuffer, dst_slots: SlotArray) -> None:
        check_copy_args(src, src_slots, dst, dst_slots)
        if src_slots.size == 0:
            return
        if isinstance(src, NumpyBuffer) and isinstance(dst, NumpyBuffer):
            runs = contiguous_runs(src_slots, dst_slots)
            if len(runs) * MIN_RUN_SLOTS <= src_slots.size:
                for s, d, n in runs:
                    dst.array[d:d + n] = src.array[s:s + n]
            else:
                dst.array[dst_slots] = src.array[src_slots]
            return
        dst.write(dst_slots, src.read(src_slots))

    def synchronize(self) -> None:
        return None

    def wait_for_copies(self) -> None:
        return None
