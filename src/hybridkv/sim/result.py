"""What a simulation reports: the SimResult contract, the per-step log it is built from,
and its JSON and table forms."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REJECTED_REASONS_KEPT = 5


@dataclass(frozen=True, slots=True)
class Occupancy:
    """GPU occupancy over simulated time, bucketed to at most a few hundred points: per bucket
    the end time, the highest in-use / slots of each pool group and the most running
    requests (a maximum, so the plot shows the peaks the per-step log saw)."""

    time_s: tuple[float, ...]
    utilization: tuple[tuple[float, ...], ...]  # [pool group][point]
    running: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SimResult:
    """The outcome of one simulation (``hybridkv simulate --json`` prints it).

    ``requests``: turns submitted (a session whose turn is rejected submits no later turns).
    ``deadlocked``: a step where no request could advance and none could be made to; the
    run ends there and reports (``deadlock_reason`` says where). Latencies are over completed
    requests (None when none completed): TTFT from arrival to the first output token, TPOT the
    mean gap between later output tokens of a request.
    """

    model: str
    workload: str
    planner: str
    policy: str
    gpu: str
    active_params: float
    slots_per_pool_group: tuple[int, ...]
    requests: int
    completed: int
    rejected: int
    rejected_reasons: tuple[str, ...]
    deadlocked: bool
    deadlock_reason: str
    steps: int
    preemptions: int
    suspensions: int
    output_tokens: int
    output_tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p90_ms: float | None
    peak_utilization_per_pool_group: tuple[float, ...]
    sim_seconds: float
    wall_seconds: float
    steps_per_wall_second: float
    bookkeeping_us_per_step_p50: float | None  # scheduler + manager CPU time per step
    occupancy: Occupancy
    notes: tuple[str, ...] = ()
    reused_tokens: int = 0  # prompt tokens served from the prefix cache
    prefix_hit_rate: float = 0.0  # reused_tokens / prompt tokens of admitted requests
    resent_tokens: int = 0  # prompt tokens repeating an earlier turn of the same conversation
    resent_reuse_rate: float = 0.0  # reused_tokens / resent_tokens

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StepLog:
    """Per-step records the simulator appends to (cheap: a few numbers per step)."""

    time_s: list[float] = field(default_factory=list)
    in_use: list[list[int]] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    bookkeeping_ns: list[int] = field(default_factory=list)

    def append(self, time_s: float, in_use: list[int], running: int, bookkeeping_ns: int) -> None:
        self.time_s.append(time_s)
        self.in_use.append(in_use)
        self.running.append(running)
        self.bookkeeping_ns.append(bookkeeping_ns)

    def peak_utilization(self, slots: tuple[int, ...]) -> tuple[float, ...]:
        if not self.in_use:
            return tuple(0.0 for _ in slots)
        peak = np.asarray(self.in_use, np.int64).max(axis=0)
        return tuple(round(int(p) / s, 6) if s else 0.0 for p, s in zip(peak, slots, strict=True))

    def occupancy(self, slots: tuple[int, ...], max_points: int) -> Occupancy:
        """Bucket the log into at most ``max_points`` points (per-bucket maxima)."""
        n = len(self.time_s)
        if n == 0:
            return Occupancy((), tuple(() for _ in slots), ())
        edges = np.unique(np.linspace(0, n, min(n, max_points) + 1).astype(np.int64))
        starts, ends = edges[:-1], edges[1:]
        use = np.asarray(self.in_use, np.float64) / np.maximum(np.asarray(slots, np.float64), 1)
        peak = np.maximum.reduceat(use, starts, axis=0)
        running = np.maximum.reduceat(np.asarray(self.running, np.int64), starts)
        times = np.asarray(self.time_s)[ends - 1]
        return Occupancy(tuple(round(float(t), 6) for t in times),
                         tuple(tuple(round(float(u), 6) for u in col) for col in peak.T),
                         tuple(int(r) for r in running))

    def bookkeeping_us_p50(self) -> float | None:
        return float(np.median(self.bookkeeping_ns)) / 1e3 if self.bookkeeping_ns else None


def percentile_ms(values_s: list[float], q: float) -> float | None:
    """The q-th percentile of ``values_s`` (seconds) in milliseconds; None if empty."""
    return round(float(np.percentile(values_s, q)) * 1e3, 3) if values_s else None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f} ms"


def format_table(r: SimResult) -> str:
    """The short readable summary ``hybridkv simulate`` prints by default."""
    peak = ", ".join(f"{u:.1%}" for u in r.peak_utilization_per_pool_group)
    rows = [
        ("model / workload", f"{r.model} / {r.workload}"),
        ("planner / policy / gpu", f"{r.planner} / {r.policy} / {r.gpu} ({r.active_params:.3g} active params)"),
        ("slots per pool group", ", ".join(str(s) for s in r.slots_per_pool_group)),
        ("requests", f"{r.requests} ({r.completed} completed, {r.rejected} rejected)"),
        ("deadlocked", "yes: " + r.deadlock_reason if r.deadlocked else "no"),
        ("steps", f"{r.steps} ({r.preemptions} preemptions, {r.suspensions} suspensions)"),
        ("output tokens/s", f"{r.output_tokens_per_s:,.1f} ({r.output_tokens} tokens in {r.sim_seconds:,.2f} s)"),
        ("prefix reuse", f"{r.prefix_hit_rate:.1%} of prompt tokens, {r.resent_reuse_rate:.1%} of resent ones "
                         f"({r.reused_tokens:,} tokens)"),
        ("TTFT p50 / p90 / p99", f"{_ms(r.ttft_p50_ms)} / {_ms(r.ttft_p90_ms)} / {_ms(r.ttft_p99_ms)}"),
        ("TPOT p50 / p90", f"{_ms(r.tpot_p50_ms)} / {_ms(r.tpot_p90_ms)}"),
        ("peak utilization", peak),
        ("simulator speed", f"{r.steps_per_wall_second:,.0f} steps/s over {r.wall_seconds:.2f} s wall; "
                            f"scheduler + manager {r.bookkeeping_us_per_step_p50 or 0:,.0f} µs/step (median)"),
    ]
    lines = [f"{k:<24} {v}" for k, v in rows]
    lines += [f"{'rejected':<24} {why}" for why in r.rejected_reasons]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
