"""``no-evict``: reserve each request's lifetime peak demand (every pool group) at admission.

Admission needs sum(reservations) + the newcomer's peak <= slots in every pool group. Every
running request's demand at any moment is at most its peak, so the running set always fits
and the scheduler never preempts (it raises InvariantError if it ever would).
"""

from __future__ import annotations

from hybridkv.planning.demand import lifetime_peak_demand
from hybridkv.scheduler.policy import SchedulerView, SchedulingPolicy
from hybridkv.scheduler.request import Tracked


class NoEvict(SchedulingPolicy):
    name = "no-evict"
    preempts = False

    def __init__(self) -> None:
        self.reserved: list[int] = []
        self._cache: dict[tuple[int, int, int], tuple[int, ...]] = {}

    def _peak(self, sched: SchedulerView, req: Tracked, chunk: int) -> tuple[int, ...]:
        key = (req.prefill_target, req.spec.total_tokens, chunk)
        if key not in self._cache:
            self._cache[key] = lifetime_peak_demand(sched.manager.grouped, req.prefill_target,
                                                    req.spec.total_tokens, chunk)
        return self._cache[key]

    def _chunk(self, sched: SchedulerView, req: Tracked) -> int:
        """The largest prefill chunk (halving from the configured one) whose peak fits an
        empty cache; 1 always does (submission checked one token at a time)."""
        chunk = sched.config.prefill_chunk_tokens
        while chunk > 1 and any(p > s for p, s in zip(self._peak(sched, req, chunk), sched.slots, strict=True)):
            chunk //= 2
        return chunk

    def chunk_for(self, sched: SchedulerView, req: Tracked) -> int:
        """The largest chunk (halving from the configured one) whose peak fits an empty cache."""
        return self._chunk(sched, req)

    def admits(self, sched: SchedulerView, req: Tracked) -> bool:
        if not self.reserved:
            self.reserved = [0] * len(sched.slots)
        peak = self._peak(sched, req, self._chunk(sched, req))
        return all(r + p <= s for r, p, s in zip(self.reserved, peak, sched.slots, strict=True))

    def on_admit(self, sched: SchedulerView, req: Tracked) -> None:
        req.chunk_limit = self._chunk(sched, req)
        req.reservation = self._peak(sched, req, req.chunk_limit)
        self.reserved = [r + p for r, p in zip(self.reserved, req.reservation, strict=True)]

    def on_exit(self, sched: SchedulerView, req: Tracked) -> None:
        self.reserved = [r - p for r, p in zip(self.reserved, req.reservation, strict=True)]
        req.reservation = ()
