"""Scheduling policies: a small base class; one policy per file, chosen by name."""

from __future__ import annotations

from typing import Protocol

from hybridkv.layouts.grouping import GroupedLayout
from hybridkv.scheduler.request import Tracked


class ChunkSetting(Protocol):
    @property
    def prefill_chunk_tokens(self) -> int: ...


class LayoutOwner(Protocol):
    @property
    def grouped(self) -> GroupedLayout: ...


class SchedulerView(Protocol):
    """What a policy sees of the scheduler (a Protocol: policies sit below scheduler.py)."""

    @property
    def config(self) -> ChunkSetting: ...

    @property
    def manager(self) -> LayoutOwner: ...

    @property
    def slots(self) -> list[int]: ...

    @property
    def num_running(self) -> int: ...


class SchedulingPolicy:
    """Decides whether the scheduler may preempt, and gates admission beyond the demand
    check every policy gets (the next step's pages must fit in every pool group)."""

    name = "base"
    preempts = True

    def admits(self, sched: SchedulerView, req: Tracked) -> bool:
        return True

    def chunk_for(self, sched: SchedulerView, req: Tracked) -> int:
        """Prefill chunk cap for a request being admitted."""
        return sched.config.prefill_chunk_tokens

    def on_admit(self, sched: SchedulerView, req: Tracked) -> None:
        return None

    def on_exit(self, sched: SchedulerView, req: Tracked) -> None:
        return None
