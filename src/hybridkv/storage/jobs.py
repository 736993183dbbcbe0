"""The asynchronous face of a lower tier: store / load / finished.

A tier reached over a network cannot finish a copy inside the manager's step, so a move to or
from a lower tier is a *job*: the manager submits it and later polls for the jobs that
finished. Until a job finishes the manager keeps every slot it touches reserved: the source
(the tier may still be reading it) and the target (it may still be writing it).

Local tiers (NumPy, memmap disk, torch) satisfy the contract trivially (``LocalTier``): they
copy inside the call and answer "done", and the manager completes the move at once, exactly
as a synchronous copy. A backend whose jobs finish later implements ``AsyncTier`` itself (see
storage/delayed.py) and is registered like any backend (``register_backend``).
"""

from __future__ import annotations

from typing import NewType, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from hybridkv.storage.backends import PoolBuffer
from hybridkv.storage.copy import CopyEngine

JobId = NewType("JobId", int)
"""One transfer of one pool group's pages, named by the manager (unique per manager)."""

SlotArray = npt.NDArray[np.int32]


@runtime_checkable
class AsyncTier(Protocol):
    """One pool group's buffer on a tier whose transfers may finish later. No method may
    block on the transfer: the step that submits a job never waits for it."""

    def store(self, job: JobId, src: PoolBuffer, src_slots: SlotArray, slots: SlotArray) -> bool:
        """Start copying ``src``'s ``src_slots`` into this tier's ``slots``; True when already
        done (then ``finished`` never reports it). Until the job finishes the caller neither
        frees nor writes ``src_slots`` and does not read ``slots``."""

    def load(self, job: JobId, slots: SlotArray, dst: PoolBuffer, dst_slots: SlotArray) -> bool:
        """Start copying this tier's ``slots`` into ``dst``'s ``dst_slots``; True when already
        done. Until the job finishes the caller neither frees ``slots`` nor reads ``dst_slots``."""

    def finished(self) -> list[JobId]:
        """Jobs finished since the last call, each reported once (the manager's poll)."""


class LocalTier:
    """The contract for a synchronous buffer: the copy engine copies inside the call."""

    def __init__(self, buffer: PoolBuffer, copy_engine: CopyEngine) -> None:
        self.buffer, self.copy_engine = buffer, copy_engine

    def store(self, job: JobId, src: PoolBuffer, src_slots: SlotArray, slots: SlotArray) -> bool:
        self.copy_engine.copy(src, src_slots, self.buffer, slots)
        return True

    def load(self, job: JobId, slots: SlotArray, dst: PoolBuffer, dst_slots: SlotArray) -> bool:
        self.copy_engine.copy(self.buffer, slots, dst, dst_slots)
        return True

    def finished(self) -> list[JobId]:
        return []


def is_async(buffer: PoolBuffer | None) -> bool:
    """Whether ``buffer`` brings its own jobs (a tier whose transfers may finish later)."""
    return buffer is not None and isinstance(buffer, AsyncTier)
