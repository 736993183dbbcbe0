"""A decode step of a hybrid model whose recurrent layers run once for the whole batch
(``runtime/recurrent.py``) against once per request (the engine before), in the same run.

    python benchmarks/bench_recurrent_decode.py [--family qwen3_next bamba jamba lfm2 minimax] [--batch 4 16 32]
                                                [--steps 8] [--json]

Each family at the engine's tiny test sizes (``runtime.model.tiny_config``: 4 layers, hidden
64), float32 on the CPU, one thread. ``--batch`` requests of 24 prompt tokens are prefilled,
then ``--steps`` decode steps are timed with the batched recurrent update and ``--steps``
with the per-request one, alternating step by step so load on the machine hits both alike.
Median milliseconds per step, and the greedy tokens of both must agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", nargs="+", default=["qwen3_next", "bamba", "jamba", "lfm2", "minimax"])
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from hybridkv.runtime import recurrent
    from hybridkv.runtime.engine import Engine, EngineConfig
    from hybridkv.runtime.model import build_model

    torch.set_num_threads(1)
    batched_check = recurrent._one_token_each
    results = []
    for family in args.family:
        for batch in args.batch:
            engines = []
            for _ in range(2):
                eng = Engine(build_model(family, seed=0), EngineConfig(
                    gpu_bytes=64 << 20, host_bytes=0, max_seq_len=128, tokens_per_block=4, max_batch_size=batch,
                    token_budget=max(64, batch), prefill_chunk_tokens=64, prefix_cache=False))
                rng = np.random.default_rng(batch)
                for _ in range(batch):
                    eng.add_request(rng.integers(0, 256, 24), 2 * args.steps + 4)
                while any(not r.outputs for r in eng.requests.values()):
                    eng.step()
                engines.append(eng)
            times: dict[str, list[float]] = {"batched": [], "per_request": []}
            try:
                for _ in range(args.steps):
                    for name, eng in zip(times, engines, strict=True):
                        recurrent._one_token_each = batched_check if name == "batched" else lambda *a: False
                        t = time.perf_counter()
                        eng.step()
                        times[name].append(time.perf_counter() - t)
            finally:
                recurrent._one_token_each = batched_check
            outputs = [[r.outputs for r in eng.requests.values()] for eng in engines]
            same = outputs[0] == outputs[1]
            r = {"family": family, "batch": batch, "batched_ms": statistics.median(times["batched"]) * 1e3,
                 "per_request_ms": statistics.median(times["per_request"]) * 1e3, "same_tokens": same}
            r["ratio"] = r["per_request_ms"] / r["batched_ms"]
            results.append(r)
            if not args.json:
                print(f"{family:12s} B={batch:3d}: batched {r['batched_ms']:7.2f} ms, per request "
                      f"{r['per_request_ms']:7.2f} ms ({r['ratio']:.2f}x), same tokens: {same}", flush=True)
    if args.json:
        print(json.dumps(results))
    return 0 if all(r["same_tokens"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
