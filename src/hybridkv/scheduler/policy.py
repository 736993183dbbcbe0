"""Scheduling policies: a small base class; one policy per file, chosen by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hybridkv.scheduler.request import Tracked
    from hybridkv.scheduler.scheduler import Scheduler


class SchedulingPolicy:
    """Decides whether the scheduler may preempt, and gates admission beyond the demand
    check every policy gets (the next step's pages must fit in every pool group)."""

    name = "base"
    preempts = True

    def admits(self, sched: Scheduler, req: Tracked) -> bool:
        return True

    def chunk_for(self, sched: Scheduler, req: Tracked) -> int:
        """Prefill chunk cap for a request being admitted."""
        return sched.config.prefill_chunk_tokens

    def on_admit(self, sched: Scheduler, req: Tracked) -> None:
        return None

    def on_exit(self, sched: Scheduler, req: Tracked) -> None:
        return None
