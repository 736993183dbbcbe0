"""``hybridkv simulate``: plan a model's pools, run a workload through the scheduler and the
manager, print what happened (a table, or ``--json``), optionally plot occupancy.

Progress: a one-line counter on stderr, redrawn at most 4 times a second and only when
stderr is a terminal (pipes, files and tests see nothing); the line is cleared at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

from hybridkv.cli.plan_args import add_plan_arguments, plan_spec_from_args
from hybridkv.core.errors import ConfigError
from hybridkv.layouts.catalog import BY_NAME
from hybridkv.layouts.spec import ModelLayout
from hybridkv.planning.planner import PlanSpec
from hybridkv.scheduler.scheduler import POLICIES
from hybridkv.sim.baseline import PLANNERS
from hybridkv.sim.cost import GPUS, MAX_ACTIVE_PARAMS, CostModel
from hybridkv.sim.plot import plot_occupancy, require_matplotlib
from hybridkv.sim.result import format_table
from hybridkv.sim.simulator import SimConfig, SimProgress, simulate
from hybridkv.sim.workloads import WORKLOADS, WorkloadSpec, make_workload

FILE_DEFAULT_ACTIVE_PARAMS = 8e9
PROGRESS_INTERVAL_S = 0.25
_PARAMS = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([KMBT]?)\s*$", re.IGNORECASE | re.ASCII)


def parse_params(text: str) -> float:
    """A parameter count: ``8e9``, ``8B``, ``3.6B``, ``500M`` or a plain number."""
    m = _PARAMS.match(text)
    if not m:
        raise ConfigError(f"--active-params: cannot read {text!r}; write e.g. 8e9, 8B or 3.6B")
    value = float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2).upper()]
    if value <= 0:
        raise ConfigError(f"--active-params must be > 0, got {text!r}")
    if not value <= MAX_ACTIVE_PARAMS:  # 1e400 reads as infinity
        raise ConfigError(f"--active-params must be <= {MAX_ACTIVE_PARAMS:g}, got {text.strip()!r:.40}")
    return value


def active_params(layout: ModelLayout, override: str | None) -> tuple[float, tuple[str, ...]]:
    """Active parameters for the cost model, and a note when it is a guess."""
    if override:
        return parse_params(override), ()
    entry = BY_NAME.get(layout.name) if layout.source.startswith("catalog:") else None
    if entry is not None:
        return entry.active_params, ()
    return FILE_DEFAULT_ACTIVE_PARAMS, (f"active_params {FILE_DEFAULT_ACTIVE_PARAMS:.3g} assumed for a model "
                                        "file (step times scale with it); pass --active-params",)


def plan_spec(args: argparse.Namespace) -> PlanSpec:
    """The PlanSpec ``hybridkv plan`` would build from the same options."""
    return plan_spec_from_args(args)


class _Progress:
    """Throttled ``\\r`` progress line on stderr, only on a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.last = 0.0
        self.shown = False

    def __call__(self, p: SimProgress) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last, self.shown = now, True
        print(f"\rsimulating: step {p.steps:,}, {p.finished:,}/{p.requests:,} requests done, "
              f"{p.sim_seconds:,.1f} s simulated", end="", file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.shown:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.plot:
        require_matplotlib()
    spec = plan_spec(args)
    params, notes = active_params(spec.layout, args.active_params)
    workload = make_workload(WorkloadSpec(args.workload, spec.max_seq_len, spec.tokens_per_block,
                                          args.requests, args.seed, args.rate))
    cost = CostModel(spec.layout, GPUS[args.gpu], params)
    progress = _Progress()
    try:
        config = SimConfig(args.planner, args.policy, check=args.check, prefix_caching=args.prefix_cache)
        result = simulate(spec, workload, cost, config, progress, notes)
    finally:
        progress.clear()
    if args.plot:
        plot_occupancy(result, args.plot)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_table(result))
        if args.plot:
            print(f"occupancy plot written to {args.plot}")
    return 0


def add_simulate_parser(subparsers: Any) -> None:
    """Register ``simulate`` on the ``hybridkv`` command's subparsers."""
    s = subparsers.add_parser("simulate", help="run a workload through the scheduler and manager",
                              description=__doc__)
    add_plan_arguments(s, "host bytes for the offload tier (suspend instead of preempt)", constraints=False)
    s.add_argument("--workload", required=True, choices=list(WORKLOADS))
    s.add_argument("--requests", type=int, help="requests (turns) to generate (default: per workload)")
    s.add_argument("--planner", choices=list(PLANNERS), default="guaranteed",
                   help="guaranteed (hybridkv) or single-request (the production baseline of issue 15401)")
    s.add_argument("--policy", choices=list(POLICIES), default="max-utilization")
    s.add_argument("--prefix-cache", action="store_true",
                   help="reuse computed prefixes across requests (multi-turn: each turn resends the conversation)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--rate", type=float, help="Poisson arrivals, sessions per second (default: all at t=0)")
    s.add_argument("--gpu", choices=list(GPUS), default="h100", help="GPU of the step-time cost model")
    s.add_argument("--active-params", help="parameters per token, e.g. 8e9 or 3.6B (default: catalog value)")
    s.add_argument("--plot", metavar="FILE.png", help="write an occupancy plot (needs matplotlib)")
    s.add_argument("--check", action="store_true", help="check liveness and manager invariants every step")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_simulate)
