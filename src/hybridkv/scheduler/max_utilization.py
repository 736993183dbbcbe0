"""``max-utilization``: admit whenever the next step fits; when running requests outgrow the
pool, suspend (or preempt) the latest arrivals. Highest throughput; may preempt.

One look ahead: prompts are known at admission, so a fresh request is admitted only while
its prompt and the prompts the admitted requests must still hold fit the pools together
(the demand at each prefill target, one decode token included). Admitting past that only
buys a preemption a few steps later: a long-context batch admitted on its first chunks
alone fills one shared arena and then recomputes its latest prompts again and again. A
request that would run alone is always admitted (liveness), and a suspended one holds its
reservation while it waits.
"""

from __future__ import annotations

from hybridkv.planning.demand import per_request_demand
from hybridkv.scheduler.policy import SchedulerView, SchedulingPolicy
from hybridkv.scheduler.request import Tracked


class MaxUtilization(SchedulingPolicy):
    name = "max-utilization"
    preempts = True

    def __init__(self) -> None:
        self.committed: list[int] = []

    def _prompt_need(self, sched: SchedulerView, req: Tracked) -> tuple[int, ...]:
        target = req.prefill_target
        return tuple(int(x) for x in per_request_demand(sched.manager.grouped, [target + 1], [target])[0])

    def admits(self, sched: SchedulerView, req: Tracked) -> bool:
        if req.reservation or sched.num_running == 0:
            return True
        if not self.committed:
            self.committed = [0] * len(sched.slots)
        need = self._prompt_need(sched, req)
        return all(c + n <= s for c, n, s in zip(self.committed, need, sched.slots, strict=True))

    def on_admit(self, sched: SchedulerView, req: Tracked) -> None:
        if not self.committed:
            self.committed = [0] * len(sched.slots)
        req.reservation = self._prompt_need(sched, req)
        self.committed = [c + n for c, n in zip(self.committed, req.reservation, strict=True)]

    def on_exit(self, sched: SchedulerView, req: Tracked) -> None:
        if req.reservation:
            self.committed = [c - n for c, n in zip(self.committed, req.reservation, strict=True)]
        req.reservation = ()
