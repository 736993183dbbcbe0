"""``max-utilization``: admit whenever the next step fits; when running requests outgrow the
pool, suspend (or preempt) the latest arrivals. Highest throughput; may preempt."""

from __future__ import annotations

from hybridkv.scheduler.policy import SchedulingPolicy


class MaxUtilization(SchedulingPolicy):
    name = "max-utilization"
    preempts = True
