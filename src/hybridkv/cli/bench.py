"""The step benchmark (``hybridkv bench step``): the manager's CPU cost per decode step.

Workload "vllm" is shared/reference/vllm-baseline.md's, so the figures compare with
benchmarks/vllm_peer_step.py run in the same session: full attention and sliding window 1024
(8 KV heads x 128 x bf16, one layer each: bookkeeping does not depend on layer count; equal
slot bytes, so both layer groups share one pool group), tokens_per_block 16. Workload
"three-group": window 128 (2 KV heads), window 1024 (4 KV heads), full (8 KV heads): three
pool groups because the slot sizes differ. Workload "qwen3-next": the catalog's qwen3-next-80b-a3b
(36 gated-delta-net states, 12 full layers); with --pools shared its states are 101 slice
groups beside the full layers' group.

One run: B requests are opened and their 2,000-token prompts prefilled in one step (untimed).
Each of N decode steps then calls ``manager.step(handles, capacity + 1, history=capacity)`` for
the whole batch (timed alone as the "step call"), reads every layer group's block table, and
updates the engine's per-request arrays (capacity, computed tokens, output tokens). That whole
step is timed too. Finally every request is closed, each close timed. Medians over steps, then
medians over repeats; repeats are interleaved across batch sizes. Bookkeeping only: the
manager has no data buffers (``StorageConfig(with_data=False)``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError, InvariantError
from hybridkv.core.limits import check_max
from hybridkv.layouts.grouping import POOL_MODES, group_layers
from hybridkv.layouts.models import load_model
from hybridkv.layouts.spec import ModelLayout, attention_layer
from hybridkv.lifecycles import Full, LifeCycle, Sliding
from hybridkv.manager.manager import KVCacheManager, ManagerConfig
from hybridkv.manager.tiers import StorageConfig
from hybridkv.planning.demand import Batch
from hybridkv.planning.planner import DEFAULT_POOLS, PlanSpec, plan

PROMPT_TOKENS = 2000
TOKENS_PER_BLOCK = 16
DEFAULT_BATCHES = (64, 256, 1024)
MAX_BATCH, MAX_STEPS, MAX_REPEATS = 1 << 16, 1 << 16, 1000
MAX_REQUEST_STEPS = 1 << 26  # --batch x --steps: the engine's output-token table (int32) stays <= 256 MiB
I64 = npt.NDArray[np.int64]

_LAYOUTS: dict[str, tuple[tuple[int, LifeCycle], ...]] = {  # (KV heads, life cycle) per layer
    "vllm": ((8, Full()), (8, Sliding(1024))),
    "three-group": ((2, Sliding(128)), (4, Sliding(1024)), (8, Full())),
    # gemma-3-27b's pattern (5 window layers, then 1 full; 62 layers): 2 groups per life cycle,
    # 31 page-sized groups with --pools shared
    "gemma-3": tuple((16, Full() if i % 6 == 5 else Sliding(1024)) for i in range(62)),
}
_CATALOG_LAYOUTS = {"qwen3-next": "qwen3-next-80b-a3b"}  # bench name: catalog model
LAYOUT_NAMES = (*_LAYOUTS, *_CATALOG_LAYOUTS)


def bench_layout(name: str) -> ModelLayout:
    """One attention layer (head dim 128, bf16) per life cycle of workload ``name``, or the
    catalog model it names."""
    if name in _CATALOG_LAYOUTS:
        return load_model(_CATALOG_LAYOUTS[name])
    if name not in _LAYOUTS:
        raise ConfigError(f"unknown bench layout {name!r}; use one of {list(LAYOUT_NAMES)}")
    layers = tuple(attention_layer(heads, 128, 2, lc) for heads, lc in _LAYOUTS[name])
    return ModelLayout(f"bench-{name}", layers)


def make_manager(layout: ModelLayout, batch: int, steps: int, pools: str = DEFAULT_POOLS) -> KVCacheManager:
    """A bookkeeping-only manager whose pools hold the batch's prefill (history 0: every block
    live, even in windowed groups) and its last decode step; constraints guarantee both."""
    max_seq_len = PROMPT_TOKENS + steps
    per_request_blocks = -(-max_seq_len // TOKENS_PER_BLOCK) + 2
    grouped = group_layers(layout, TOKENS_PER_BLOCK, pools)
    gpu_bytes = batch * per_request_blocks * sum(lg.slot_bytes for lg in grouped.layer_groups)
    spec = PlanSpec(layout, gpu_bytes, max_seq_len, TOKENS_PER_BLOCK, max_batch_size=batch, pools=pools,
                    constraints=(Batch.uniform("bench prefill", batch, PROMPT_TOKENS, 0),
                                 Batch.uniform("bench decode", batch, max_seq_len)))
    config = ManagerConfig(max_active_requests=batch, storage=StorageConfig(with_data=False))
    return KVCacheManager(plan(spec), config)


@dataclass(frozen=True)
class StepRun:
    """One repeat at one batch size, over its steps (microseconds). The median is a step with
    no block boundary; the mean also carries the boundary steps (every tokens_per_block-th
    step all requests allocate, windowed groups free) and the first decode step, which
    releases the window-stale blocks of the whole prompt."""

    step_call_us: float  # median
    whole_step_us: float  # median
    step_call_mean_us: float
    whole_step_mean_us: float
    whole_step_max_us: float
    close_us_per_request: float  # median over requests


@dataclass(frozen=True)
class StepResult:
    """Medians over repeats for one batch size: the benchmark's output (and its JSON)."""

    layout: str
    pool_groups: int
    batch: int
    steps: int
    repeats: int
    step_call_us_per_step_median: float  # manager.step alone
    us_per_step_median: float  # step + block tables + engine bookkeeping
    us_per_request_step_median: float  # whole step / batch
    step_call_us_per_step_mean: float  # means over steps (boundary steps included), median over repeats
    us_per_step_mean: float
    us_per_step_max: float
    close_us_per_request_median: float
    pools_mode: str = DEFAULT_POOLS
    layer_groups: int = 0


def _prefill(manager: KVCacheManager, batch: int) -> tuple[I64, I64]:
    handles = np.array([manager.open() for _ in range(batch)], dtype=np.int64)
    capacity = np.full(batch, PROMPT_TOKENS, np.int64)
    if manager.step(handles, capacity, np.zeros(batch, np.int64)) is None:
        raise InvariantError(f"bench: prefill of {batch} x {PROMPT_TOKENS} tokens did not fit the plan")
    return handles, capacity


def _decode(manager: KVCacheManager, handles: I64, capacity: I64, steps: int) -> tuple[list[int], list[int]]:
    """``steps`` decode steps of the whole batch; returns (step-call ns, whole-step ns) per step."""
    families = range(len(manager.rows.families))
    computed = capacity.copy()  # engine side: tokens computed per request
    output_tokens = np.zeros((handles.size, steps), np.int32)
    call_ns: list[int] = []
    whole_ns: list[int] = []
    gc.collect()
    for i in range(steps):
        t0 = time.perf_counter_ns()
        c_new = capacity + 1
        t1 = time.perf_counter_ns()
        tables = manager.step(handles, c_new, capacity)
        t2 = time.perf_counter_ns()
        if tables is None:
            raise InvariantError(f"bench: decode step {i} ran short of slots")
        width = 0
        for f in families:  # the engine hands these to its kernels; shape forces a real view / copy
            width += tables.family_table(f).shape[1]
        capacity = c_new
        computed += 1
        output_tokens[:, i] = i + 1
        t3 = time.perf_counter_ns()
        call_ns.append(t2 - t1)
        whole_ns.append(t3 - t0)
    return call_ns, whole_ns


def _verify(manager: KVCacheManager, handles: I64, steps: int) -> None:
    """Invariants plus the lengths every request must end at."""
    manager.check_invariants()
    want = (PROMPT_TOKENS + steps, PROMPT_TOKENS + steps - 1)
    for h in handles.tolist():
        lengths = manager.lengths(h)
        if (lengths.capacity, lengths.history) != want:
            raise InvariantError(f"bench: request {h} ended at {lengths}, expected (capacity, history) {want}")


def run_once(layout_name: str, batch: int, steps: int, check: bool = False, pools: str = DEFAULT_POOLS) -> StepRun:
    """One repeat: prefill, ``steps`` timed decode steps, timed closes. With ``check``, the
    manager's invariants and final lengths are verified before and after closing."""
    manager = make_manager(bench_layout(layout_name), batch, steps, pools)
    handles, capacity = _prefill(manager, batch)
    call_ns, whole_ns = _decode(manager, handles, capacity, steps)
    if check:
        _verify(manager, handles, steps)
    close_ns = []
    for h in handles.tolist():
        t0 = time.perf_counter_ns()
        manager.close(h)
        close_ns.append(time.perf_counter_ns() - t0)
    if check:
        manager.check_invariants()
        if any(a.num_in_use for tier in manager.tiers.allocators for a in tier):
            raise InvariantError("bench: slots still in use after every request closed")
    return StepRun(statistics.median(call_ns) / 1e3, statistics.median(whole_ns) / 1e3,
                   statistics.fmean(call_ns) / 1e3, statistics.fmean(whole_ns) / 1e3, max(whole_ns) / 1e3,
                   statistics.median(close_ns) / 1e3)


def summarize(layout_name: str, batch: int, steps: int, runs: list[StepRun], pools: str = DEFAULT_POOLS
              ) -> StepResult:
    """Medians over repeats."""
    grouped = group_layers(bench_layout(layout_name), TOKENS_PER_BLOCK, pools)
    return StepResult(
        layout_name, len(grouped.pool_groups), batch, steps, len(runs),
        statistics.median(r.step_call_us for r in runs), statistics.median(r.whole_step_us for r in runs),
        statistics.median(r.whole_step_us / batch for r in runs),
        statistics.median(r.step_call_mean_us for r in runs), statistics.median(r.whole_step_mean_us for r in runs),
        statistics.median(r.whole_step_max_us for r in runs), statistics.median(r.close_us_per_request for r in runs),
        pools, len(grouped.layer_groups))


def bench_step(batches: tuple[int, ...] = DEFAULT_BATCHES, steps: int = 200, repeats: int = 5,
               layout_name: str = "vllm", check: bool = False, pools: str = DEFAULT_POOLS) -> list[StepResult]:
    """The step benchmark over several batch sizes, repeats interleaved across them."""
    bench_layout(layout_name)
    for what, value in {"--batch": min(batches, default=0), "--steps": steps, "--repeats": repeats}.items():
        if value < 1:
            raise ConfigError(f"bench step: {what} must be >= 1, got {value}")
    for what, value, bound in (("--batch", max(batches), MAX_BATCH), ("--steps", steps, MAX_STEPS),
                               ("--repeats", repeats, MAX_REPEATS),
                               ("--batch x --steps", max(batches) * steps, MAX_REQUEST_STEPS)):
        check_max(f"bench step: {what}", value, bound, "a benchmark run needs far fewer")
    runs: dict[int, list[StepRun]] = {b: [] for b in batches}
    for _ in range(repeats):
        for b in batches:
            runs[b].append(run_once(layout_name, b, steps, check, pools))
    return [summarize(layout_name, b, steps, runs[b], pools) for b in batches]


@dataclass(frozen=True)
class BookkeepingMemory:
    """NumPy bytes the manager owns for bookkeeping, by part, over its GPU slot count."""

    num_slots: int
    max_active_requests: int
    max_seq_len: int
    bytes_by_part: dict[str, int]

    @property
    def bytes_per_slot(self) -> float:
        return sum(self.bytes_by_part.values()) / self.num_slots


def _array_bytes(value: object) -> int:
    """sys.getsizeof of an array owning its data (data + header), nbytes of a view;
    lists of arrays are summed; anything else counts 0."""
    if isinstance(value, np.ndarray):
        return sys.getsizeof(value) if value.base is None else int(value.nbytes)
    if isinstance(value, list):
        return sum(_array_bytes(v) for v in value)
    return 0


def bookkeeping_memory(num_slots: int = 1 << 20, max_active_requests: int = 512, max_seq_len: int = 32768,
                       layout_name: str = "vllm") -> BookkeepingMemory:
    """Build a bookkeeping-only manager with ~``num_slots`` GPU slots and sum every NumPy array
    attribute of the manager, its ActiveRows and its slot allocators (all tiers). Defaults:
    512 rows x 2048 blocks (32768 / 16) = 2^20 table entries per layer group, so the full
    group's table alone can address every slot."""
    layout = bench_layout(layout_name)
    grouped = group_layers(layout, TOKENS_PER_BLOCK)
    spec = PlanSpec(layout, num_slots * grouped.pool_groups[0].slot_bytes, max_seq_len, TOKENS_PER_BLOCK)
    scale = num_slots / sum(plan(spec).slots)  # pools of different slot bytes: rescale the quota once
    spec = PlanSpec(layout, int(spec.gpu_bytes * scale), max_seq_len, TOKENS_PER_BLOCK)
    config = ManagerConfig(max_active_requests=max_active_requests, storage=StorageConfig(with_data=False))
    manager = KVCacheManager(plan(spec), config)
    rows = manager.rows
    allocators = [a for tier in manager.tiers.allocators for a in tier]
    parts = {
        "allocators (free stacks + in_use bitmaps, every tier)":
            sum(_array_bytes(getattr(a, s)) for a in allocators for s in type(a).__slots__),
        "block tables": _array_bytes(rows.tables),
        "row arrays (handle, lengths, priority, seq_lens, released)":
            sum(_array_bytes(v) for k, v in vars(rows).items() if k != "tables"),
        "manager handle index (_state, _row, _mark)": sum(_array_bytes(v) for v in vars(manager).values()),
    }
    return BookkeepingMemory(sum(manager.plan.slots), max_active_requests, max_seq_len, parts)


# ---- the command ------------------------------------------------------------------------
def cmd_bench_step(args: argparse.Namespace) -> int:
    results = bench_step(tuple(args.batch), args.steps, args.repeats, args.layout, pools=args.pools)
    if args.json:
        rows = [asdict(r) for r in results]
        out: dict[str, Any] = rows[0] if len(rows) == 1 else {"results": rows}
        print(json.dumps(out, indent=2))
        return 0
    r0 = results[0]
    print(f"layout {r0.layout} ({r0.pool_groups} pool groups, {r0.layer_groups} layer groups, {r0.pools_mode} "
          f"pools), {r0.steps} decode steps after a "
          f"{PROMPT_TOKENS}-token prefill, {r0.repeats} repeats; microseconds, medians over steps "
          "unless 'mean' / 'max', then medians over repeats")
    print(f"{'B':>6} {'step call':>10} {'whole step':>11} {'per req-step':>13} {'call mean':>10} "
          f"{'whole mean':>11} {'whole max':>10} {'close/req':>10}")
    for r in results:
        print(f"{r.batch:>6} {r.step_call_us_per_step_median:>10,.1f} {r.us_per_step_median:>11,.1f} "
              f"{r.us_per_request_step_median:>13.3f} {r.step_call_us_per_step_mean:>10,.1f} "
              f"{r.us_per_step_mean:>11,.1f} {r.us_per_step_max:>10,.0f} {r.close_us_per_request_median:>10.2f}")
    return 0


def add_bench_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``hybridkv bench step`` on the top-level command's subparsers."""
    bench = sub.add_parser("bench", help="micro-benchmarks of the runtime manager")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    s = kinds.add_parser("step", help="CPU cost per decode step (the vLLM baseline workload)")
    s.add_argument("--batch", type=int, nargs="+", default=list(DEFAULT_BATCHES), help="batch sizes")
    s.add_argument("--steps", type=int, default=200, help="decode steps per run")
    s.add_argument("--repeats", type=int, default=5, help="runs per batch size (interleaved)")
    s.add_argument("--layout", choices=LAYOUT_NAMES, default="vllm")
    s.add_argument("--pools", choices=POOL_MODES, default=DEFAULT_POOLS)
    s.add_argument("--json", action="store_true",
                   help="one object for one --batch, else {\"results\": [...]}")
    s.set_defaults(func=cmd_bench_step)
