"""The trace-driven simulator: the real Scheduler and KVCacheManager (bookkeeping only, no
data buffers) run a workload; the cost model turns each step into simulated seconds.

The loop, per step:

1. submit every turn that has arrived (a turn the scheduler refuses at submission is counted
   as rejected with its reason, and ends its session);
2. ``Scheduler.schedule()`` builds the step through the manager;
3. a step where the scheduler reports a deadlock ends the run (``deadlocked``); so does a
   step where nothing advanced although requests wait (the liveness invariant broke: with
   ``check`` that raises InvariantError instead);
4. the clock moves by the cost model's step time; ``Scheduler.complete()`` records outputs;
   a finished turn schedules its session's next turn after its think time;
5. with ``check``, ``manager.check_invariants()`` every ``check_every`` steps.

When nothing runs or waits, the clock jumps to the next arrival. The run ends when every
session is done, or at a deadlock: it never hangs.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hybridkv.core.errors import ConfigError, InvariantError
from hybridkv.core.limits import check_max
from hybridkv.core.types import GPU
from hybridkv.manager.manager import KVCacheManager, ManagerConfig
from hybridkv.manager.tiers import StorageConfig
from hybridkv.planning.planner import PlanSpec, PoolPlan
from hybridkv.scheduler.request import SeqRequest, Status, Tracked
from hybridkv.scheduler.scheduler import POLICIES, SchedulerConfig, StepPlan
from hybridkv.sim.baseline import PLANNERS
from hybridkv.sim.cost import CostModel
from hybridkv.sim.result import REJECTED_REASONS_KEPT, SimResult, StepLog, percentile_ms
from hybridkv.sim.workloads import Workload

PROGRESS_EVERY_STEPS = 64
# What one simulation holds in memory; far above the shipped workloads (issue-15401: 64 x 8.6k
# table entries, 8.8M tokens), far below what a laptop runs out of.
MAX_SIM_SEQ_LEN = 1 << 24  # the scheduler evaluates a request's demand at every position
MAX_SIM_SLOTS = 1 << 24  # bookkeeping arrays per slot, GPU and host
MAX_SIM_TABLE_ENTRIES = 1 << 26  # block-table entries per layer group: max_batch_size x blocks
MAX_SIM_TOKENS = 1 << 28  # token ids of every session of the workload


@dataclass(frozen=True, slots=True)
class SimConfig:
    """How to run: planner and scheduling policy by name, invariant checks, plot points."""

    planner: str = "guaranteed"
    policy: str = "max-utilization"
    check: bool = False
    check_every: int = 1
    occupancy_points: int = 400
    token_budget: int = 8192
    prefill_chunk_tokens: int = 2048
    max_steps: int | None = None  # stop early (benchmarks); the result then counts fewer completions
    prefix_caching: bool = False  # reuse computed prefixes across requests (manager/prefix.py)

    def __post_init__(self) -> None:
        if self.planner not in PLANNERS:
            raise ConfigError(f"unknown --planner {self.planner!r}; use one of {', '.join(PLANNERS)}")
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown --policy {self.policy!r}; use one of {', '.join(POLICIES)}")
        if self.check_every < 1 or self.occupancy_points < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ConfigError("check_every, occupancy_points and max_steps must be >= 1")


@dataclass(frozen=True, slots=True)
class SimProgress:
    """Passed to the progress callback every few dozen steps."""

    steps: int
    finished: int
    requests: int
    sim_seconds: float


def check_simulable(spec: PlanSpec, workload: Workload, plan: PoolPlan) -> None:
    """ConfigError naming the option when the run would hold more than the MAX_SIM_* bounds
    (a plan alone takes any size; a simulation allocates per slot, row, position and token)."""
    check_max("simulate: --max-seq-len", spec.max_seq_len, MAX_SIM_SEQ_LEN, "simulate shorter requests")
    blocks = -(-spec.max_seq_len // spec.tokens_per_block)
    check_max(f"simulate: --max-batch-size ({spec.max_batch_size}) x blocks of --max-seq-len ({blocks})",
              spec.max_batch_size * blocks, MAX_SIM_TABLE_ENTRIES, "lower either, or raise --tokens-per-block")
    slots = sum(plan.slots) + sum(pg.host_slots for pg in plan.pool_groups)
    check_max(f"simulate: slots of the plan ({plan.slots} GPU)", slots, MAX_SIM_SLOTS,
              "lower --gpu-mem / --host-mem, or raise --tokens-per-block")
    tokens = sum(max((t.prompt_tokens + t.max_new_tokens for t in s.turns), default=0) for s in workload.sessions)
    check_max("simulate: tokens of the workload's sessions", tokens, MAX_SIM_TOKENS,
              "lower --requests or --max-seq-len")


class Simulator:
    """One run: build the plan, the manager and the scheduler; ``run()`` once."""

    def __init__(self, spec: PlanSpec, workload: Workload, cost: CostModel, config: SimConfig | None = None,
                 notes: tuple[str, ...] = ()) -> None:
        self.spec, self.workload, self.cost = spec, workload, cost
        self.config = config or SimConfig()
        choice = PLANNERS[self.config.planner]
        self.plan = choice.build(spec)
        check_simulable(spec, workload, self.plan)
        self.manager = KVCacheManager(self.plan, ManagerConfig(
            max_active_requests=spec.max_batch_size, storage=StorageConfig(with_data=False)))
        self.scheduler = choice.scheduler(self.manager, SchedulerConfig(
            max_batch_size=spec.max_batch_size, token_budget=max(self.config.token_budget, spec.max_batch_size),
            prefill_chunk_tokens=self.config.prefill_chunk_tokens, policy=self.config.policy))
        if self.config.prefix_caching:
            self.manager.enable_prefix_cache()
        self._streams: dict[int, np.ndarray] = {}  # session -> its token ids (prompts + outputs)
        self._resent = 0  # prompt tokens that repeat an earlier turn of the same session
        self.notes = notes
        self.now = 0.0
        self.log = StepLog()
        self._arrivals: list[tuple[float, int, int, int]] = []  # (time, seq, session, turn)
        for i, s in enumerate(workload.sessions):
            heapq.heappush(self._arrivals, (s.arrival_s, i, i, 0))
        self._arrival_seq = len(workload.sessions)
        self._session_of: dict[int, tuple[int, int]] = {}  # request id -> (session, turn)
        self._tracked: list[Tracked] = []
        self._rejected: list[Tracked] = []
        self._ttft_s: list[float] = []
        self._tpot_s: list[float] = []
        self._finished = 0
        self.deadlock_reason = ""

    # ---- arrivals -----------------------------------------------------------------------
    def _submit_due(self) -> None:
        while self._arrivals and self._arrivals[0][0] <= self.now:
            arrival, _, si, ti = heapq.heappop(self._arrivals)
            turn = self.workload.sessions[si].turns[ti]
            rid = len(self._tracked)
            tokens = self._stream(si)[:turn.prompt_tokens + turn.max_new_tokens]
            if ti:  # the conversation so far, resent in this prompt
                prev = self.workload.sessions[si].turns[ti - 1]
                self._resent += prev.prompt_tokens + prev.max_new_tokens
            t = self.scheduler.submit(SeqRequest(rid, turn.prompt_tokens, turn.max_new_tokens, arrival, tokens=tokens))
            self._tracked.append(t)
            self._session_of[rid] = (si, ti)
            if t.status is Status.REJECTED:
                self._rejected.append(t)  # the session ends: later turns build on this one

    def _stream(self, session: int) -> np.ndarray:
        """A session's token ids: turn k's prompt is the conversation so far (earlier prompts
        and outputs) plus its new message, so consecutive turns share prefixes exactly."""
        if session not in self._streams:
            turns = self.workload.sessions[session].turns
            n = max(t.prompt_tokens + t.max_new_tokens for t in turns)
            rng = np.random.default_rng([self.workload.spec.seed, session])
            self._streams[session] = rng.integers(1, 1 << 20, n).astype(np.int32)
        return self._streams[session]

    def _on_finished(self, t: Tracked) -> None:
        self._finished += 1
        assert t.first_token_s is not None and t.finish_s is not None
        self._ttft_s.append(t.first_token_s - t.spec.arrival_s)
        if t.generated > 1:
            self._tpot_s.append((t.finish_s - t.first_token_s) / (t.generated - 1))
        si, ti = self._session_of[t.spec.request_id]
        turns = self.workload.sessions[si].turns
        if ti + 1 < len(turns):
            heapq.heappush(self._arrivals, (self.now + turns[ti + 1].think_s, self._arrival_seq, si, ti + 1))
            self._arrival_seq += 1

    def _busy(self) -> bool:
        return self.scheduler.num_waiting > 0 or self.manager.rows.n > 0

    # ---- the loop -----------------------------------------------------------------------
    def run(self, progress: Callable[[SimProgress], None] | None = None) -> SimResult:
        """Simulate until every session is done or the scheduler deadlocks."""
        wall0 = time.perf_counter()
        gpu = self.manager.tiers.allocators[GPU]
        steps = 0
        while steps != self.config.max_steps:
            self._submit_due()
            if not self._busy():
                if not self._arrivals:
                    break
                self.now = max(self.now, self._arrivals[0][0])
                continue
            moved0 = self.manager.counters.offload_bytes + self.manager.counters.onboard_bytes
            t0 = time.perf_counter_ns()
            plan = self.scheduler.schedule()
            t1 = time.perf_counter_ns()
            if not plan.advanced:
                self.deadlock_reason = self._why_stuck(plan, steps)
                break
            moved = self.manager.counters.offload_bytes + self.manager.counters.onboard_bytes - moved0
            self.now += self.cost.step(plan.capacity, plan.history, float(moved)).seconds
            t2 = time.perf_counter_ns()
            finished = self.scheduler.complete(plan, self.now)
            t3 = time.perf_counter_ns()
            for t in finished:
                self._on_finished(t)
            steps += 1
            self.log.append(self.now, [a.num_in_use for a in gpu], self.manager.rows.n, (t1 - t0) + (t3 - t2))
            if self.config.check and steps % self.config.check_every == 0:
                self.manager.check_invariants()
            if progress is not None and steps % PROGRESS_EVERY_STEPS == 0:
                progress(SimProgress(steps, self._finished, self.workload.num_requests, self.now))
        return self._result(steps, time.perf_counter() - wall0)

    def _why_stuck(self, plan: StepPlan, steps: int) -> str:
        """The deadlock report; with ``check``, a stall the scheduler did not report raises."""
        free = self.manager.tiers.free_slots(GPU)
        state = (f"{self.manager.rows.n} running, {self.scheduler.num_waiting} waiting; free GPU slots per "
                 f"pool group {free} of {list(self.plan.slots)}")
        if plan.deadlocked:
            head = min((self.scheduler.by_handle[int(h)] for h in plan.handles), key=lambda t: t.seq)
            hist = int(plan.history[plan.handles.tolist().index(head.handle)])
            return (f"at step {steps}: request {head.spec.request_id} (the earliest running, history {hist}) "
                    f"cannot take one token and no other request can make room; {state}")
        msg = f"at step {steps}: no request advanced and the scheduler reported no deadlock; {state}"
        if self.config.check:
            raise InvariantError(f"liveness broken {msg}")
        return "stalled " + msg

    def _result(self, steps: int, wall_s: float) -> SimResult:
        sched, slots = self.scheduler, self.plan.slots
        output_tokens = sum(t.generated for t in self._tracked)
        prompt_tokens = sum(t.spec.prompt_tokens for t in self._tracked if t.status is not Status.REJECTED)
        reasons = tuple(f"request {t.spec.request_id} ({t.spec.prompt_tokens} + {t.spec.max_new_tokens} tokens): "
                        f"{t.reason}" for t in self._rejected[:REJECTED_REASONS_KEPT])
        return SimResult(
            model=self.spec.layout.name, workload=self.workload.spec.name, planner=self.config.planner,
            policy=self.config.policy, gpu=self.cost.gpu.name, active_params=self.cost.active_params,
            slots_per_pool_group=slots, requests=len(self._tracked), completed=self._finished,
            rejected=len(self._rejected), rejected_reasons=reasons,
            deadlocked=bool(self.deadlock_reason), deadlock_reason=self.deadlock_reason, steps=steps,
            preemptions=sched.preemptions, suspensions=sched.suspensions, output_tokens=output_tokens,
            output_tokens_per_s=round(output_tokens / self.now, 3) if self.now > 0 else 0.0,
            ttft_p50_ms=percentile_ms(self._ttft_s, 50), ttft_p90_ms=percentile_ms(self._ttft_s, 90),
            ttft_p99_ms=percentile_ms(self._ttft_s, 99), tpot_p50_ms=percentile_ms(self._tpot_s, 50),
            tpot_p90_ms=percentile_ms(self._tpot_s, 90),
            peak_utilization_per_pool_group=self.log.peak_utilization(slots),
            sim_seconds=round(self.now, 6), wall_seconds=round(wall_s, 4),
            steps_per_wall_second=round(steps / wall_s, 1) if wall_s > 0 else 0.0,
            bookkeeping_us_per_step_p50=self.log.bookkeeping_us_p50(),
            occupancy=self.log.occupancy(slots, self.config.occupancy_points), notes=self.notes,
            reused_tokens=sched.reused_tokens, resent_tokens=self._resent,
            resent_reuse_rate=round(sched.reused_tokens / self._resent, 4) if self._resent else 0.0,
            prefix_hit_rate=round(sched.reused_tokens / prompt_tokens, 4) if prompt_tokens else 0.0,
        )


def simulate(spec: PlanSpec, workload: Workload, cost: CostModel, config: SimConfig | None = None,
             progress: Callable[[SimProgress], None] | None = None, notes: tuple[str, ...] = ()) -> SimResult:
    """Plan ``spec``, run ``workload`` through the scheduler and manager, and report."""
    return Simulator(spec, workload, cost, config, notes).run(progress)
