"""``no-evict``: reserve each request's lifetime peak demand (every pool group) at admission.

Admission needs sum(reservations) + the newcomer's peak <= slots in every pool group. Every
running request's demand at any moment is at most its peak, so the running set always fits
and the scheduler never preempts (it raises InvariantError if it ever would).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hybridkv.demand import lifetime_peak_demand
from hybridkv.scheduler.policy import SchedulingPolicy

if TYPE_CHECKING:
    from hybridkv.scheduler.request import Tracked
    from hybridkv.scheduler.scheduler import Scheduler


class NoEvict(SchedulingPolicy):
    name = "no-evict"
    preempts = False

    def __init__(self) -> None:
        self.reserved: list[int] = []
        self._cache: dict[tuple[int, int], tuple[int, ...]] = {}

    def _peak(self, sched: Scheduler, req: Tracked) -> tuple[int, ...]:
        key = (req.prefill_target, req.spec.total_tokens)
        if key not in self._cache:
            self._cache[key] = lifetime_peak_demand(sched.manager.grouped, req.prefill_target,
                                                    req.spec.total_tokens, sched.config.prefill_chunk_tokens)
        return self._cache[key]

    def admits(self, sched: Scheduler, req: Tracked) -> bool:
        if not self.reserved:
            self.reserved = [0] * len(sched.slots)
        peak = self._peak(sched, req)
        return all(r + p <= s for r, p, s in zip(self.reserved, peak, sched.slots, strict=True))

    def on_admit(self, sched: Scheduler, req: Tracked) -> None:
        req.reservation = self._peak(sched, req)
        self.reserved = [r + p for r, p in zip(self.reserved, req.reservation, strict=True)]

    def on_exit(self, sched: Scheduler, req: Tracked) -> None:
        self.reserved = [r - p for r, p in zip(self.reserved, req.reservation, strict=True)]
        req.reservation = ()
