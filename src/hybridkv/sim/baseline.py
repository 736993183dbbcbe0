"""Planners the simulator can run, by name: hybridkv's guaranteed planner and the
single-request baseline that reproduces the production bug of issue 15401.

``single-request`` is what the production manager did: every pool group's floor is the
demand of ONE request at max_seq_len (capacity L, history L - 1), the byte split between
groups follows that same request, and slot counts are rounded down (no leftover spreading).
In a windowed group that request keeps only its last block live, so the floor is 1 slot and
the split gives the group a tiny share: it sits at 1 slot, while any request whose window
straddles a block boundary needs 2. It is paired with the admission check that trusted the
same formula (``FinalLengthScheduler``: only the last position is checked at submission).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from hybridkv.layouts.grouping import group_layers
from hybridkv.planning.demand import demand, per_request_demand
from hybridkv.planning.planner import Floor, PlanSpec, PoolPlan, plan
from hybridkv.scheduler.request import SeqRequest
from hybridkv.scheduler.scheduler import Scheduler


def single_request_plan(spec: PlanSpec) -> PoolPlan:
    """The baseline: floors and split from one request at max_seq_len (see the module doc),
    over a pool per life cycle (the production managers' layout)."""
    spec = dataclasses.replace(spec, pools="per-lifecycle")
    grouped = group_layers(spec.layout, spec.tokens_per_block, spec.pools)
    length = spec.max_seq_len
    need = demand(grouped, [length], [length - 1])
    source = f"1 request at max_seq_len {length}, history {length - 1} (single-request baseline)"
    return plan(spec, floors=tuple(Floor(n, source) for n in need), typical=need, spread_leftover=False)


def guaranteed_plan(spec: PlanSpec) -> PoolPlan:
    """hybridkv's planner (floors from guarantees)."""
    return plan(spec)


class FinalLengthScheduler(Scheduler):
    """The baseline's admission: a request is refused at submission only if its LAST position
    does not fit alone, the formula the single-request planner trusted (its window straddles
    earlier are missed). Lives here: nothing but the baseline uses it."""

    def submission_demand(self, spec: SeqRequest) -> tuple[int, ...]:
        need = per_request_demand(self.manager.grouped, [spec.total_tokens], [spec.total_tokens - 1])[0]
        return tuple(int(x) for x in need)


@dataclass(frozen=True, slots=True)
class PlannerChoice:
    """A planner and the scheduler (admission check) it comes with."""

    name: str
    build: Callable[[PlanSpec], PoolPlan]
    scheduler: type[Scheduler]


PLANNERS: dict[str, PlannerChoice] = {
    "guaranteed": PlannerChoice("guaranteed", guaranteed_plan, Scheduler),
    "single-request": PlannerChoice("single-request", single_request_plan, FinalLengthScheduler),
}
