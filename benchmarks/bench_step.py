"""hybridkv's step benchmark against vLLM 0.33's KVCacheManager, in one run, as a markdown report.

Run: python benchmarks/bench_step.py [--steps N] [--repeats R]. Takes a few minutes.

Each repeat runs, in turn: hybridkv on the vLLM baseline workload for every B (64, 256, 1024),
the vLLM peer (benchmarks/vllm_peer_step.py in its own interpreter, one subprocess per repeat
with ``--repeats 1``, same B list and steps), and hybridkv's three-pool-group layout
(B = 256, 1024). Interleaving the repeats spreads the noise of a shared machine over both
sides; figures are medians over steps (a step with no block boundary), then medians over
repeats; "mean" columns average over steps instead (boundary steps and the first decode
step, which frees the prompt's window-stale blocks, included; the peer reports medians only). Then the
manager's bookkeeping bytes per slot at 2^20 GPU slots. Without the peer's environment it
prints how to install it and reports hybridkv alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from hybridkv.cli.bench import StepResult, StepRun, bookkeeping_memory, run_once, summarize
from hybridkv.layouts.grouping import POOL_MODES
from hybridkv.planning.planner import DEFAULT_POOLS

PEER_PYTHON = Path("/tmp/vllm_peer/bin/python")
PEER_SCRIPT = Path(__file__).with_name("vllm_peer_step.py")
INSTALL = """\
The vLLM peer is not installed ({python} is missing); reporting hybridkv alone. To install it
(a separate environment, never a project dependency; see shared/reference/vllm-baseline.md):

    python3 -m venv /tmp/vllm_peer
    /tmp/vllm_peer/bin/pip install torch==2.13.0
    /tmp/vllm_peer/bin/pip install --no-deps vllm==0.33.0
    /tmp/vllm_peer/bin/pip install packaging numpy psutil pyzmq urllib3 regex msgspec pydantic \\
      cbor2 transformers aiohttp requests openai_harmony openai pillow pybase64 cachetools \\
      cloudpickle uvloop py-cpuinfo prometheus_client xgrammar fastapi partial_json_parser llguidance
"""


def run_peer(python: Path, batches: list[int], steps: int) -> dict[int, dict[str, Any]]:
    """One repeat of the peer for every batch size: its JSON results by batch."""
    cmd = [str(python), str(PEER_SCRIPT), "--batch", *map(str, batches), "--steps", str(steps),
           "--repeats", "1", "--json"]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return {int(r["batch"]): r for r in out["results"]}


def peer_medians(rounds: list[dict[int, dict[str, Any]]], batch: int) -> dict[str, float]:
    keys = ("allocate_us_per_step_median", "step_us_per_step_median", "free_us_per_request_median")
    return {k: statistics.median(float(r[batch][k]) for r in rounds) for k in keys}


def print_main_table(results: list[StepResult], peer: list[dict[int, dict[str, Any]]]) -> None:
    print("| B | hybridkv step call µs/step | hybridkv whole step µs/step | vLLM allocate_slots µs/step "
          "| vLLM whole step µs/step | ratio whole (vLLM / hybridkv) | ratio allocate-only "
          "| close µs/req hybridkv / vLLM free | hybridkv mean over steps: call / whole |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        cells = [f"{r.batch}", f"{r.step_call_us_per_step_median:,.1f}", f"{r.us_per_step_median:,.1f}"]
        mean = f"{r.step_call_us_per_step_mean:,.1f} / {r.us_per_step_mean:,.1f}"
        if peer:
            p = peer_medians(peer, r.batch)
            cells += [f"{p['allocate_us_per_step_median']:,.0f}", f"{p['step_us_per_step_median']:,.0f}",
                      f"{p['step_us_per_step_median'] / r.us_per_step_median:.1f}x",
                      f"{p['allocate_us_per_step_median'] / r.step_call_us_per_step_median:.1f}x",
                      f"{r.close_us_per_request_median:.1f} / {p['free_us_per_request_median']:.1f}", mean]
        else:
            cells += ["—", "—", "—", "—", f"{r.close_us_per_request_median:.1f} / —", mean]
        print("| " + " | ".join(cells) + " |")


def print_three_group(results: list[StepResult]) -> None:
    print("| B | step call µs/step | whole step µs/step | µs per request-step | step-call growth vs previous B "
          "| mean over steps: call / whole | max whole step µs |")
    print("|---|---|---|---|---|---|---|")
    prev: StepResult | None = None
    for r in results:
        growth = "—" if prev is None else (
            f"{r.step_call_us_per_step_median / prev.step_call_us_per_step_median:.2f}x "
            f"for {r.batch / prev.batch:.0f}x requests")
        print(f"| {r.batch} | {r.step_call_us_per_step_median:,.1f} | {r.us_per_step_median:,.1f} "
              f"| {r.us_per_request_step_median:.3f} | {growth} "
              f"| {r.step_call_us_per_step_mean:,.1f} / {r.us_per_step_mean:,.1f} | {r.us_per_step_max:,.0f} |")
        prev = r


def print_memory() -> None:
    print("| layout | GPU slots | max_active_requests x max_seq_len | part | bytes | bytes per slot |")
    print("|---|---|---|---|---|---|")
    for name in ("vllm", "three-group"):
        m = bookkeeping_memory(layout_name=name)
        for part, n in m.bytes_by_part.items():
            print(f"| {name} | {m.num_slots:,} | {m.max_active_requests} x {m.max_seq_len} | {part} | {n:,} "
                  f"| {n / m.num_slots:.3f} |")
        print(f"| {name} | | | **total** | {sum(m.bytes_by_part.values()):,} | **{m.bytes_per_slot:.2f}** |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--three-group-batch", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    ap.add_argument("--pools", choices=POOL_MODES, default=DEFAULT_POOLS,
                    help="hybridkv's pool mode; with shared, the second table is gemma-3's pattern (31 arena groups)")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    second = "gemma-3" if args.pools == "shared" else "three-group"
    have_peer = args.peer_python.exists()
    if not have_peer:
        print(INSTALL.format(python=args.peer_python))
    runs: dict[int, list[StepRun]] = {b: [] for b in args.batch}
    runs3: dict[int, list[StepRun]] = {b: [] for b in args.three_group_batch}
    runs_second: dict[int, list[StepRun]] = {b: [] for b in args.three_group_batch}
    peer: list[dict[int, dict[str, Any]]] = []
    for i in range(args.repeats):
        print(f"repeat {i + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
        for b in args.batch:
            runs[b].append(run_once("vllm", b, args.steps, pools=args.pools))
        if have_peer:
            peer.append(run_peer(args.peer_python, args.batch, args.steps))
        for b in args.three_group_batch:
            runs3[b].append(run_once("three-group", b, args.steps, pools=args.pools))
            if second != "three-group":
                runs_second[b].append(run_once(second, b, args.steps, pools=args.pools))
    print(f"{datetime.date.today()}, {platform.machine()} {platform.processor() or ''}, Python "
          f"{platform.python_version()}, NumPy {np.__version__}; {args.steps} decode steps after a 2,000-token "
          f"prefill, {args.repeats} interleaved repeats; medians over steps, then over repeats\n")
    print("Workload of shared/reference/vllm-baseline.md (full + window 1024, one pool group; vLLM prefix caching on)"
          "\n")
    print(f"hybridkv pools: {args.pools}\n")
    print_main_table([summarize("vllm", b, args.steps, runs[b], args.pools) for b in args.batch], peer)
    print("\nThree pool groups (window 128, window 1024, full), hybridkv only\n")
    print_three_group([summarize("three-group", b, args.steps, runs3[b], args.pools) for b in args.three_group_batch])
    if second != "three-group":
        print(f"\n{second}: 52 window + 10 full layers, one arena of 31 page-sized groups, hybridkv only\n")
        print_three_group([summarize(second, b, args.steps, runs_second[b], args.pools)
                           for b in args.three_group_batch])
    if not args.skip_memory:
        print("\nBookkeeping memory at 2^20 GPU slots (NumPy arrays owned by the manager: sys.getsizeof)\n")
        print_memory()


if __name__ == "__main__":
    main()
