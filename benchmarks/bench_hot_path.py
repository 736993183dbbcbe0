"""The per-step hot path at growing batch sizes: scheduler + manager, the step after a batch
of prefills, and closing a batch.

For each B (default 64 ... 4096) and each bench layout ("vllm": full + window 1024 in one
pool group; "three-group": windows 128 and 1024 and full attention, three pool groups; see
``hybridkv.cli.bench``), one run:

1. B requests with 2,000-token prompts and ``--steps`` outputs are submitted to a Scheduler
   over a bookkeeping-only manager sized for them; the first ``schedule()`` admits all of
   them and prefills every prompt in one chunk ("admit+prefill", per request).
2. The next ``schedule() + complete()`` is the first decode: it releases every window block
   the prompts left behind (~61 per request for window 1024, ~117 for window 128).
3. Steady decode steps: ``schedule() + complete()`` median over the run ("step").
4. The last step's ``complete()`` finishes all B requests at once: one batched close
   (``KVCacheManager.close_many``), reported per request.

Also the manager alone: ``manager.step`` for the first decode after a one-step prefill of B
prompts (no scheduler), as ``hybridkv bench step`` sets it up. Medians over ``--repeats``.

    python benchmarks/bench_hot_path.py [--batch 64 256 1024 4096] [--steps 64] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from hybridkv.cli.bench import PROMPT_TOKENS, _prefill, bench_layout, make_manager
from hybridkv.core.errors import InvariantError
from hybridkv.scheduler.request import SeqRequest, Status
from hybridkv.scheduler.scheduler import Scheduler, SchedulerConfig

LAYOUTS = ("vllm", "three-group")


@dataclass(frozen=True)
class Row:
    layout: str
    batch: int
    admit_prefill_us_per_request: float
    first_decode_ms: float
    step_us: float
    step_us_per_request: float
    close_us_per_request: float
    manager_first_decode_ms: float


def _ms(t0: int, t1: int) -> float:
    return (t1 - t0) / 1e6


def scheduler_run(layout: str, batch: int, steps: int) -> tuple[float, float, float, float]:
    """(admit+prefill µs per request, first decode ms, steady step µs, close µs per request)."""
    m = make_manager(bench_layout(layout), batch, steps)
    s = Scheduler(m, SchedulerConfig(max_batch_size=batch, token_budget=batch * PROMPT_TOKENS,
                                     prefill_chunk_tokens=PROMPT_TOKENS))
    tracked = [s.submit(SeqRequest(i, PROMPT_TOKENS, steps)) for i in range(batch)]
    gc.collect()
    t0 = time.perf_counter_ns()
    plan = s.schedule()
    t1 = time.perf_counter_ns()
    if plan.handles.size != batch:
        raise InvariantError(f"hot path: admitted {plan.handles.size} of {batch}")
    s.complete(plan, 0.0)  # the prompts are prefilled: each emits its first token
    t2 = time.perf_counter_ns()
    s.complete(s.schedule(), 1.0)
    t3 = time.perf_counter_ns()
    step_ns, close_ns = [], 0
    for k in range(2, steps):
        a = time.perf_counter_ns()
        plan = s.schedule()
        b = time.perf_counter_ns()
        done = s.complete(plan, float(k))
        c = time.perf_counter_ns()
        if done:  # the last step: every request finishes and is closed in this complete()
            close_ns = c - b
        else:
            step_ns.append(c - a)
    if not all(t.status is Status.FINISHED for t in tracked) or m.rows.n:
        raise InvariantError("hot path: not every request finished")
    m.check_invariants()
    return ((t1 - t0) / 1e3 / batch, _ms(t2, t3), statistics.median(step_ns) / 1e3, close_ns / 1e3 / batch)


def manager_first_decode(layout: str, batch: int) -> float:
    m = make_manager(bench_layout(layout), batch, 2)
    handles, capacity = _prefill(m, batch)
    gc.collect()
    t0 = time.perf_counter_ns()
    tables = m.step(handles, capacity + 1, capacity)
    t1 = time.perf_counter_ns()
    if tables is None:
        raise InvariantError("hot path: first decode refused")
    return _ms(t0, t1)


def bench(batches: list[int], steps: int, repeats: int) -> list[Row]:
    runs: dict[tuple[str, int], list[tuple[float, ...]]] = {}
    for _ in range(repeats):  # repeats interleaved across sizes: load drifts hit every size alike
        for layout in LAYOUTS:
            for b in batches:
                runs.setdefault((layout, b), []).append((*scheduler_run(layout, b, steps),
                                                         manager_first_decode(layout, b)))
    rows = []
    for (layout, b), rs in runs.items():
        med = [statistics.median(r[i] for r in rs) for i in range(5)]
        rows.append(Row(layout, b, round(med[0], 2), round(med[1], 3), round(med[2], 1), round(med[2] / b, 3),
                        round(med[3], 2), round(med[4], 3)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = bench(args.batch, args.steps, args.repeats)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return
    print(f"bench_hot_path: {PROMPT_TOKENS}-token prompts, {args.steps} outputs, median of {args.repeats}; "
          f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    print("| layout | B | admit+prefill µs/req | first decode ms (sched+mgr) | step µs (sched+mgr) | µs/req-step "
          "| close µs/req (batched) | manager first decode ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.layout} | {r.batch} | {r.admit_prefill_us_per_request:.1f} | {r.first_decode_ms:.2f} "
              f"| {r.step_us:,.1f} | {r.step_us_per_request:.3f} | {r.close_us_per_request:.2f} "
              f"| {r.manager_first_decode_ms:.2f} |")


if __name__ == "__main__":
    main()
