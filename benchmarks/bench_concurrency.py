"""Concurrency measured through the reference engine, against what ``hybridkv plan`` predicts.

    python benchmarks/bench_concurrency.py [--requests 48] [--window 16] [--length 128] [--json]

One tiny Gemma-3-style model with seeded random weights, run twice on the CPU with the same
KV memory:
- as configured: 3 sliding-window layers to 1 full-attention layer;
- the same weights with every layer full attention.

Both runs get the same requests: ``--requests`` prompts of ``length - 16`` tokens, each
generating 16 tokens, all submitted at once. Two numbers are compared:
- *Measured:* the most requests the engine's scheduler ran in one step.
- *Predicted:* the plan's concurrency at ``length`` tokens (``max_concurrency``, the number
  ``hybridkv plan`` prints) for the same memory, rounded down to whole requests.

The engine prefills in chunks of one page (``tokens_per_block``). Longer chunks hold a
window layer's whole chunk beside its window, and admission reserves that transient.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import numpy as np


def run(model: Any, gpu_bytes: int, length: int, requests: int, tpb: int) -> dict[str, Any]:
    from hybridkv.planning.report import max_concurrency
    from hybridkv.runtime.engine import Engine, EngineConfig

    eng = Engine(model, EngineConfig(gpu_bytes=gpu_bytes, host_bytes=0, max_seq_len=length,
                                     tokens_per_block=tpb, max_batch_size=requests, token_budget=max(512, requests),
                                     prefill_chunk_tokens=tpb, prefix_cache=False))
    rng = np.random.default_rng(0)
    vocab = eng.vocab_size
    for _ in range(requests):
        eng.add_request(rng.integers(0, vocab, length - 16), max_new_tokens=16)
    peak, steps = 0, 0
    while eng.has_work:
        eng.step()
        steps += 1
        peak = max(peak, eng.scheduler.num_running)
    predicted = max_concurrency(eng.plan, length).requests
    done = sum(len(r.outputs) == 16 for r in eng.requests.values())
    return {"predicted": predicted, "predicted_whole": math.floor(predicted), "measured_peak": peak,
            "steps": steps, "completed": done, "gpu_bytes_used": eng.plan.gpu_bytes_used}


def measure(requests: int, window: int, length: int, tpb: int, gpu_bytes: int) -> dict[str, Any]:
    import torch

    from hybridkv.runtime.model import build_model

    torch.set_num_threads(1)
    pattern = ["sliding_attention"] * 3 + ["full_attention"]
    windowed = build_model("gemma3_text", seed=0, sliding_window=window, layer_types=pattern)
    full = build_model("gemma3_text", seed=0, sliding_window=window, layer_types=["full_attention"] * 4)
    full.load_state_dict(windowed.state_dict())
    a = run(windowed, gpu_bytes, length, requests, tpb)
    b = run(full, gpu_bytes, length, requests, tpb)
    return {"window": window, "length": length, "requests": requests, "tokens_per_block": tpb,
            "gpu_bytes": gpu_bytes, "windowed": a, "all_full": b,
            "predicted_factor": a["predicted"] / b["predicted"],
            "measured_factor": a["measured_peak"] / b["measured_peak"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--tokens-per-block", type=int, default=4)
    ap.add_argument("--gpu-kib", type=int, default=384, help="KV memory of both runs, KiB")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = measure(args.requests, args.window, args.length, args.tokens_per_block, args.gpu_kib * 1024)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    for name in ("windowed", "all_full"):
        x = r[name]
        print(f"{name:>9}: predicted {x['predicted']:.2f} requests at {r['length']} tokens, measured peak "
              f"{x['measured_peak']} running ({x['completed']} of {r['requests']} completed, {x['steps']} steps)")
    print(f"factor: predicted {r['predicted_factor']:.2f}, measured {r['measured_factor']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
