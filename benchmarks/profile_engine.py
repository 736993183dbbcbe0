"""Where one decode step of the reference engine goes on a CUDA GPU: host phases and kernels.

    PYTHONPATH=src python3 benchmarks/profile_engine.py [--batch 32 256] [--context 2048] [--json F]

The model and requests are ``bench_engine.py``'s (Gemma-3-1B-sized, bf16, all requests
decoding). Per batch size, over ``--steps`` decode steps replayed from CUDA graphs:

- **host phases** (median µs): ``schedule``, ``_pack``, the graph run up to the replay's
  enqueue, the wait for the GPU, ``_emit`` (sampling and token events), ``complete``;
- **GPU time of one replay** between CUDA events, beside the step's bytes over the copy
  bandwidth measured in the same run;
- **kernels**: torch.profiler's per-kernel CUDA time over a few replayed steps, the top 15.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from bench_engine import GEMMA3_1B, copy_bandwidth, prefilled_engine, save_json, sync


def phases(torch: Any, eng: Any, steps: int) -> dict[str, float]:
    """Median µs per phase of ``steps`` engine steps."""
    spent: dict[str, list[float]] = {}
    marks: dict[str, float] = {}

    def wrap(obj: Any, name: str, key: str, wait: bool = False) -> None:
        orig = getattr(obj, name)

        def timed(*a: Any) -> Any:
            t = time.perf_counter()
            r = orig(*a)
            if wait:  # the enqueue, then the wait for the GPU, apart
                marks["enqueued"] = time.perf_counter()
                sync(torch)
                spent.setdefault("gpu wait", []).append(time.perf_counter() - marks["enqueued"])
                spent.setdefault(key, []).append(marks["enqueued"] - t)
            else:
                spent.setdefault(key, []).append(time.perf_counter() - t)
            return r
        setattr(obj, name, timed)

    wrap(eng.scheduler, "schedule", "schedule")
    wrap(eng.scheduler, "complete", "complete")
    wrap(eng, "_pack", "pack")
    wrap(eng, "_emit", "emit")
    wrap(eng.graphs, "run", "graph run (enqueue)", wait=True)
    whole = []
    for _ in range(steps):
        sync(torch)
        t = time.perf_counter()
        eng.step()
        sync(torch)
        whole.append(time.perf_counter() - t)
    for obj, names in ((eng.scheduler, ("schedule", "complete")), (eng, ("_pack", "_emit")), (eng.graphs, ("run",))):
        for name in names:
            delattr(obj, name)
    out = {k: statistics.median(v) * 1e6 for k, v in spent.items()}
    out["whole step"] = statistics.median(whole) * 1e6
    out["other host"] = out["whole step"] - sum(v for k, v in out.items() if k != "whole step")
    return out


def replay_gpu_us(torch: Any, eng: Any, batch: int, repeats: int = 20) -> float:
    graph, _ = eng.graphs.graphs[min(s for s in eng.graphs.graphs if s >= batch)]
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()  # the last step's inputs again: its K/V rewritten with the same values
        b.record()
        sync(torch)
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def kernels(torch: Any, eng: Any, steps: int = 3) -> list[tuple[str, float, int]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        sync(torch)
    rows = []
    for e in prof.key_averages():
        cuda_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if cuda_us > 0:
            rows.append((e.key[:70], cuda_us / steps, e.count // steps))
    return sorted(rows, key=lambda r: -r[1])[:15]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("profile_engine: needs a CUDA device", file=sys.stderr)
        return 2
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": copy_bandwidth(torch, "cuda")}
    for b in args.batch:
        _, eng, _, _ = prefilled_engine(torch, GEMMA3_1B, "cuda", b, args.context, 2 * args.steps + 4)
        eng.step()  # captures
        row = {"batch": b, "context": args.context, "phases_us": phases(torch, eng, args.steps),
               "replay_gpu_us": replay_gpu_us(torch, eng, b), "kernels": kernels(torch, eng)}
        out.setdefault("rows", []).append(row)
        print(f"B={b} ctx={args.context}: replay {row['replay_gpu_us']:.0f} µs on the GPU; host phases (µs): "
              + ", ".join(f"{k} {v:.0f}" for k, v in row["phases_us"].items()), flush=True)
        for name, us, count in row["kernels"]:
            print(f"    {us:9.1f} µs  x{count:<4d} {name}", flush=True)
        del eng
        torch.cuda.empty_cache()
        save_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
