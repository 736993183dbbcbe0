"""Simulator speed: scheduler + manager CPU time per step with B requests running at once,
and simulated steps per wall second. Bookkeeping only (no data buffers), CPU only.

Run: python benchmarks/bench_sim.py [--batch 256 1024] [--steps N] [--repeats R] [--json]

Per model and B: a decode-heavy workload of B requests (prompts 64-256, outputs 1k-4k tokens)
arrives at t = 0 with max_batch_size B and a KV quota large enough that all B run together
(memory is bookkeeping, so any quota is free). The run stops after ``--steps`` steps, before
the first request can finish (outputs >= 1024 tokens), so the steps after admission all run
exactly B requests: one decode token each, through Scheduler.schedule(), the manager's batched
step, and Scheduler.complete(). "µs/step" is the median over those steps of the time spent in
schedule() + complete(); "steps/s" is the whole simulator loop over the run (the B
submission checks, the admission steps, the cost model and logging included). Median over
repeats.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from dataclasses import asdict, dataclass

import numpy as np

from hybridkv.layouts.catalog import BY_NAME
from hybridkv.layouts.models import load_model
from hybridkv.planning.planner import PlanSpec
from hybridkv.sim import GPUS, CostModel, SimConfig, Simulator, WorkloadSpec, make_workload

MAX_SEQ_LEN = 4608  # prompt <= 256 + output <= 4096 fits
TOKENS_PER_BLOCK = 16
MODELS = ("llama-3.1-8b", "gpt-oss-20b", "issue-15401")


@dataclass(frozen=True, slots=True)
class BenchRow:
    """One model at one B: medians over repeats."""

    model: str
    batch: int
    pool_groups: int
    steps_at_batch: int
    bookkeeping_us_per_step: float
    us_per_request_step: float
    sim_steps_per_s: float


def run_once(model: str, batch: int, steps: int) -> tuple[float, int, float, int]:
    """(median µs of schedule + complete over the steps with ``batch`` running, how many such
    steps, simulator steps/s, pool groups)."""
    layout = load_model(model)
    gpu_bytes = int(batch * MAX_SEQ_LEN * layout.kv_bytes_per_token() * 1.2) + (1 << 30)
    spec = PlanSpec(layout, gpu_bytes=gpu_bytes, max_seq_len=MAX_SEQ_LEN, tokens_per_block=TOKENS_PER_BLOCK,
                    max_batch_size=batch)
    wl = make_workload(WorkloadSpec("decode-heavy", MAX_SEQ_LEN, TOKENS_PER_BLOCK, num_requests=batch, seed=0))
    sim = Simulator(spec, wl, CostModel(layout, GPUS["h100"], BY_NAME[model].active_params),
                    SimConfig(max_steps=steps))
    result = sim.run()
    running = np.asarray(sim.log.running)
    at_batch = np.asarray(sim.log.bookkeeping_ns)[running == batch]
    if at_batch.size == 0:
        raise SystemExit(f"{model} B={batch}: never ran {batch} requests at once (raise --steps)")
    return float(np.median(at_batch)) / 1e3, int(at_batch.size), result.steps_per_wall_second, len(sim.plan.slots)


def bench(model: str, batch: int, steps: int, repeats: int) -> BenchRow:
    runs = [run_once(model, batch, steps) for _ in range(repeats)]
    us = statistics.median(r[0] for r in runs)
    return BenchRow(model, batch, runs[0][3], runs[0][1], round(us, 1), round(us / batch, 3),
                    round(statistics.median(r[2] for r in runs), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [bench(m, b, args.steps, args.repeats) for m in args.models for b in args.batch]
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return
    print(f"bench_sim: decode-heavy, tpb {TOKENS_PER_BLOCK}, {args.steps} steps, median of {args.repeats}; "
          f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    print("| model | B | pool groups | steps at B | scheduler+manager µs/step (median) | µs per request-step "
          "| simulated steps/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.model} | {r.batch} | {r.pool_groups} | {r.steps_at_batch} | {r.bookkeeping_us_per_step:,.1f} "
              f"| {r.us_per_request_step:.3f} | {r.sim_steps_per_s:,.1f} |")


if __name__ == "__main__":
    main()
