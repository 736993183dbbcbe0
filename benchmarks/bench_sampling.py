"""Temperature sampling of one step's rows: the engine's batched seeded draw
(``runtime/sampling.py``) against the per-request draw it replaced, in the same run.

    python benchmarks/bench_sampling.py [--rows 8 64 256] [--vocab 262144] [--repeats 5] [--device cpu]

The replaced draw (the engine before this benchmark): per request, ``softmax`` of its
float64 logits over the temperature on the CPU, then ``torch.multinomial`` with the request's
own ``torch.Generator``. The batched draw: one Gumbel-max over every row on the logits'
device, its uniforms hashed from (seed, position, token id). Median seconds per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any


def per_request(torch: Any, logits: Any, temps: list[float], generators: list[Any]) -> list[int]:
    out = []
    for j, g in enumerate(generators):
        probs = torch.softmax(logits[j].double().cpu() / temps[j], dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=g)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--vocab", type=int, default=262_144)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from hybridkv.runtime import sampling

    torch.set_num_threads(1)
    results = []
    for rows in args.rows:
        logits = torch.randn(rows, args.vocab, generator=torch.Generator().manual_seed(rows)).to(args.device)
        temps = [0.7] * rows
        t_temps = torch.full((rows,), 0.7, device=args.device)
        seeds = torch.arange(rows, device=args.device)
        old, new = [], []
        for k in range(args.repeats):  # interleaved, so load on the machine hits both alike
            generators = [torch.Generator().manual_seed(j) for j in range(rows)]
            t = time.perf_counter()
            per_request(torch, logits, temps, generators)
            old.append(time.perf_counter() - t)
            t = time.perf_counter()
            sampling.sample(logits, t_temps, seeds, torch.full((rows,), k, device=args.device)).tolist()
            new.append(time.perf_counter() - t)
        r = {"rows": rows, "vocab": args.vocab, "per_request_ms": statistics.median(old) * 1e3,
             "batched_ms": statistics.median(new) * 1e3}
        r["ratio"] = r["per_request_ms"] / r["batched_ms"]
        results.append(r)
        if not args.json:
            print(f"rows {rows:4d} x vocab {args.vocab}: per request {r['per_request_ms']:8.1f} ms, "
                  f"batched {r['batched_ms']:8.1f} ms ({r['ratio']:.1f}x)", flush=True)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
