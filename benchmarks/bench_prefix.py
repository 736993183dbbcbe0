"""Multi-turn prefix reuse at several pool occupancies (simulated; bookkeeping only).

    python benchmarks/bench_prefix.py [--requests 200]

Each turn of a conversation resends the whole conversation so far. For each model and KV
quota the workload runs twice with the same seed: without the prefix cache, which measures
the *occupancy* (time-averaged fraction of GPU slot bytes held by running requests: their own
demand, nothing cached), and with it, which measures reuse: the share of resent tokens served
from the cache, and of all prompt tokens.
"""

from __future__ import annotations

import argparse

from hybridkv.cli.specs import parse_batch
from hybridkv.core.types import GIB
from hybridkv.layouts.catalog import BY_NAME
from hybridkv.layouts.grouping import group_layers
from hybridkv.layouts.models import load_model
from hybridkv.planning.planner import PlanSpec
from hybridkv.sim.cost import GPUS, CostModel
from hybridkv.sim.simulator import SimConfig, simulate
from hybridkv.sim.workloads import WorkloadSpec, make_workload

CASES = [  # model, KV quota (GiB), typical step (room for cached windows), host tier for cached pages (GiB)
    ("gpt-oss-20b", 6.0, None, 0.0), ("gpt-oss-20b", 2.5, None, 0.0), ("gpt-oss-20b", 2.5, None, 16.0),
    ("gpt-oss-20b", 1.2, None, 0.0), ("gpt-oss-20b", 1.2, None, 16.0),
    ("gpt-oss-20b", 0.8, None, 0.0), ("gpt-oss-20b", 0.8, None, 16.0),
    ("gemma-3-27b", 48.0, "16x4k", 0.0), ("gemma-3-27b", 24.0, "16x4k", 0.0), ("gemma-3-27b", 24.0, "16x4k", 64.0),
    ("gemma-3-27b", 14.0, "16x4k", 64.0), ("gemma-3-27b", 10.0, "16x4k", 64.0),
]


def occupancy(result, slot_bytes: tuple[int, ...]) -> float:  # type: ignore[no-untyped-def]
    """Time-averaged, byte-weighted fraction of GPU slots in use."""
    util = result.occupancy.utilization
    total = sum(s * n for s, n in zip(slot_bytes, result.slots_per_pool_group, strict=True))
    points = len(result.occupancy.time_s)
    per_point = [sum(util[g][i] * slot_bytes[g] * result.slots_per_pool_group[g] for g in range(len(util))) / total
                 for i in range(points)]
    return sum(per_point) / max(points, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    print("| model | KV quota | typical step | host tier | occupancy without cache | prefix hit rate (prompt tokens) "
          "| reused / resent tokens | completed | preemptions |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, gib, typical, host in CASES:
        layout = load_model(name)
        spec = PlanSpec(layout, int(gib * GIB), 32768, max_batch_size=16, host_bytes=int(host * GIB),
                        typical_step=parse_batch(typical, "typical", "--typical") if typical else None)
        wl = make_workload(WorkloadSpec("multi-turn", spec.max_seq_len, spec.tokens_per_block, args.requests, 0))
        cost = CostModel(layout, GPUS["h100"], BY_NAME[name].active_params)
        plain = simulate(spec, wl, cost, SimConfig())
        cached = simulate(spec, wl, cost, SimConfig(prefix_caching=True))
        slot_bytes = tuple(pg.slot_bytes for pg in group_layers(layout, spec.tokens_per_block).pool_groups)
        print(f"| {name} | {gib:g} GiB | {typical or 'default'} | {host:g} GiB | "
              f"{occupancy(plain, slot_bytes):.0%} | {cached.prefix_hit_rate:.1%} | {cached.resent_reuse_rate:.1%} | "
              f"{cached.completed}/{cached.requests} | {cached.preemptions} |", flush=True)

if __name__ == "__main__":
    main()
