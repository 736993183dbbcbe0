"""Planner speed: a 128-layer hybrid model (4 life cycles, 2 SSM) with 8 constraints.

Run: python benchmarks/bench_planner.py [--repeats N]. Prints the median and p90 in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

from hybridkv.core.types import GIB
from hybridkv.layouts.spec import ModelLayout, attention_layer, ssm_layer
from hybridkv.lifecycles import Chunked, Full, Sliding, worst_decode_blocks
from hybridkv.planning.demand import Batch
from hybridkv.planning.planner import PlanSpec, plan
from hybridkv.planning.report import plan_json


def layout_128() -> ModelLayout:
    kinds = [attention_layer(8, 128, 2, Sliding(1024)),
             attention_layer(8, 128, 2, Sliding(128, 4)),
             attention_layer(8, 128, 2, Chunked(8192)),
             ssm_layer(24576, 524288, 2, 2)]
    layers = [kinds[i % 4] if i % 8 else attention_layer(8, 128, 2, Full()) for i in range(128)]
    return ModelLayout("bench-128", tuple(layers), 131072)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    cons = tuple(Batch.uniform(f"c{i}", 2 + i, 4096 * (i + 1), 4096 * i) for i in range(8))
    spec = PlanSpec(layout_128(), 400 * GIB, 65536, tokens_per_block=16, max_batch_size=16,
                    constraints=cons)
    plan_ms, total_ms = [], []
    for _ in range(args.repeats):
        worst_decode_blocks.cache_clear()  # cold: no memoized worst cases from the last run
        t0 = time.perf_counter()
        p = plan(spec)
        t1 = time.perf_counter()
        plan_json(p)  # the rest of `hybridkv plan --json`: concurrency and length reports
        t2 = time.perf_counter()
        plan_ms.append((t1 - t0) * 1e3)
        total_ms.append((t2 - t0) * 1e3)
    print(f"128 layers, 8 constraints, {args.repeats} cold runs: plan median "
          f"{statistics.median(plan_ms):.2f} ms; plan + reports median {statistics.median(total_ms):.2f} ms")


if __name__ == "__main__":
    main()
