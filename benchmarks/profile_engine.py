"""Where one decode step of the reference engine goes on a CUDA GPU: host phases and kernels.

    PYTHONPATH=src python3 benchmarks/profile_engine.py [--batch 32 256] [--context 2048] [--json F]

The model and requests are ``bench_engine.py``'s (Gemma-3-1B-sized, bf16, all requests
decoding). Per batch size, over ``--steps`` decode steps replayed from CUDA graphs:

- **host phases** (median µs), the steps run one after another (no overlap) so each phase is
  timed alone: ``schedule``, ``pack``, the graph run up to the replay's enqueue, the wait for
  the GPU, ``sample`` (enqueued), ``deliver`` (the tokens read, token events), ``complete``;
- **GPU time of one replay** between CUDA events, and a step with overlap on (the default);
- **kernels**: torch.profiler's per-kernel CUDA time over a few replayed steps, the top 15.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from bench_engine import (
    GEMMA3_1B,
    copy_bandwidth,
    prefilled_engine,
    replay_gpu_ms,
    save_json,
    set_overlap,
    sync,
    timed_steps,
)


def phases(torch: Any, eng: Any, steps: int) -> dict[str, float]:
    """Median µs per phase of ``steps`` engine steps, run one after another; then the step
    with overlap (the default)."""
    from hybridkv.runtime import engine as engine_module

    spent: dict[str, list[float]] = {}

    def wrap(orig: Any, key: str, wait: bool = False) -> Any:
        def timed(*a: Any) -> Any:
            t = time.perf_counter()
            r = orig(*a)
            if wait:  # the enqueue, then the wait for the GPU, apart
                enqueued = time.perf_counter()
                sync(torch)
                spent.setdefault("gpu wait", []).append(time.perf_counter() - enqueued)
                spent.setdefault(key, []).append(enqueued - t)
            else:
                spent.setdefault(key, []).append(time.perf_counter() - t)
            return r
        return timed

    set_overlap(eng, False)
    saved_pack, sampler = engine_module.pack, eng.sampler
    eng.scheduler.schedule = wrap(eng.scheduler.schedule, "schedule")
    eng.scheduler.complete = wrap(eng.scheduler.complete, "complete")
    engine_module.pack = wrap(saved_pack, "pack")
    eng.sampler = wrap(sampler, "sample")
    eng._deliver = wrap(eng._deliver, "deliver")
    eng.graphs.run = wrap(eng.graphs.run, "graph run (enqueue)", wait=True)
    whole = []
    try:
        for _ in range(steps):
            sync(torch)
            t = time.perf_counter()
            eng.step()
            sync(torch)
            whole.append(time.perf_counter() - t)
    finally:
        del eng.scheduler.schedule, eng.scheduler.complete, eng._deliver, eng.graphs.run
        engine_module.pack, eng.sampler = saved_pack, sampler
    out = {k: statistics.median(v) * 1e6 for k, v in spent.items()}
    out["whole step"] = statistics.median(whole) * 1e6
    out["other host"] = out["whole step"] - sum(v for k, v in out.items() if k != "whole step")
    set_overlap(eng, True)
    out["step with overlap"] = timed_steps(torch, eng, steps, 0, runs=1)["step_ms"] * 1e3
    return out


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
    ap.add_argument("--own-projections", action="store_true",
                    help="q / k / v and gate / up as transformers runs them (one GEMM each), not fused")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("profile_engine: needs a CUDA device", file=sys.stderr)
        return 2
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": copy_bandwidth(torch, "cuda")}
    for b in args.batch:
        model, eng, _, _ = prefilled_engine(torch, GEMMA3_1B, "cuda", b, args.context, args.steps)
        if args.own_projections:
            from hybridkv.runtime import projections

            projections.uninstall(model)
            if eng.graphs is not None:
                eng.graphs.reset()  # (in case a graph was captured over the fused ones)
        eng.step()  # captures
        row = {"batch": b, "context": args.context, "own_projections": args.own_projections,
               "phases_us": phases(torch, eng, args.steps),
               "replay_gpu_us": replay_gpu_ms(torch, eng, b) * 1e3, "kernels": kernels(torch, eng)}
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
