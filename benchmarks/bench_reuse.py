"""Prefix reuse speed per 1k-token prompt (64 blocks of 16): keys, insert, probe, evictable.

The index already holds ``--background`` other prompts (so dicts and arrays have realistic
sizes). Layouts: full attention only; gpt-oss style (full + window 128); a 5-group hybrid
(full, window 1024, window 128 + 4 sinks, chunked 8192, SSM). Attention groups insert every
block of the prompt, SSM groups one snapshot at its end.

Run: python benchmarks/bench_reuse.py [--repeats N] [--background P]. Prints medians in µs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from hybridkv.core.types import GPU
from hybridkv.lifecycles import Chunked, Full, LifeCycle, Sliding, Ssm
from hybridkv.reuse import PrefixIndex, ReuseScope, block_keys

TPB, PROMPT_TOKENS = 16, 1024
LAYOUTS: dict[str, list[LifeCycle]] = {
    "full": [Full()],
    "full+window128": [Full(), Sliding(128)],
    "hybrid-5": [Full(), Sliding(1024), Sliding(128, 4), Chunked(8192),
                 Ssm()],
}
SCOPE = ReuseScope()


def median_us(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def insert_prompt(idx: PrefixIndex, keys: list[bytes], lcs: list[LifeCycle], slot0: int) -> None:
    n = len(keys)
    for g, lc in enumerate(lcs):
        ords = np.array([n - 1]) if isinstance(lc, Ssm) else np.arange(n)
        idx.insert(keys, ords, g, slot0 + ords, GPU, root=SCOPE.root())


def bench_layout(name: str, lcs: list[LifeCycle], repeats: int, background: int, rng: np.random.Generator) -> None:
    idx = PrefixIndex()
    for p in range(background):
        insert_prompt(idx, block_keys(rng.integers(0, 50_000, PROMPT_TOKENS), TPB, SCOPE), lcs, p * 64)
    prompts = [rng.integers(0, 50_000, PROMPT_TOKENS).astype(np.int32) for _ in range(repeats)]
    chains = [block_keys(t, TPB, SCOPE) for t in prompts]
    it = iter(range(repeats))

    def insert_new() -> None:
        i = next(it)
        insert_prompt(idx, chains[i], lcs, (background + i) * 64)

    ins = median_us(insert_new, repeats)  # every prompt of `chains` is now cached
    cached, cold = chains[0], block_keys(rng.integers(0, 50_000, PROMPT_TOKENS), TPB, SCOPE)
    dup = median_us(lambda: insert_prompt(idx, cached, lcs, 0), repeats)
    hit = median_us(lambda: idx.probe(cached, lcs, TPB), repeats)
    miss = median_us(lambda: idx.probe(cold, lcs, TPB), repeats)
    half = cached[:32] + cold[32:]
    part = median_us(lambda: idx.probe(half, lcs, TPB), repeats)
    assert idx.probe(cached, lcs, TPB).tokens == PROMPT_TOKENS and idx.probe(cold, lcs, TPB).tokens == 0
    evict = median_us(lambda: idx.evictable(GPU, limit=64), max(5, repeats // 20))
    print(f"{name:16s} {len(idx):8d} {ins:9.1f} {dup:9.1f} {hit:9.1f} {part:9.1f} {miss:9.1f} {evict:11.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=500)
    ap.add_argument("--background", type=int, default=1000, help="other 1k-token prompts already cached")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50_000, PROMPT_TOKENS).astype(np.int32)
    keys_us = median_us(lambda: block_keys(tokens, TPB, SCOPE), args.repeats)
    keys_list_us = median_us(lambda: block_keys(tokens.tolist(), TPB, SCOPE), args.repeats)
    print(f"block_keys, 1k tokens (64 blocks): {keys_us:.1f} µs from int32 array, {keys_list_us:.1f} µs from a list")
    print(f"median µs per 1k-token prompt; index holds --background={args.background} prompts first")
    print(f"{'layout':16s} {'entries':>8s} {'insert':>9s} {'ins-dup':>9s} {'probe-hit':>9s} {'probe-½':>9s} "
          f"{'probe-miss':>9s} {'evictable64':>11s}")
    for name, lcs in LAYOUTS.items():
        bench_layout(name, lcs, args.repeats, args.background, rng)


if __name__ == "__main__":
    main()
