# mypy: ignore-errors
"""vLLM v1 BlockPool with N cached blocks: the cost of evicting 64 of them (the peer of
benchmarks/bench_prefix_scale.py).

A ``BlockPool`` with prefix caching on and N + 1 blocks (block 0 is vLLM's null block) is
filled the way vLLM's KV cache manager fills it: requests with distinct 1,024-token prompts
(64 blocks of 16, hashed by vLLM's default sha256 block hasher) get 64 blocks each
(``get_new_blocks``), ``cache_full_blocks`` gives them their hashes, and ``free_blocks`` returns
them in reverse order (as the manager frees a request), so every free block is a cached block
in the free queue. Then, median over repeats:

* ``get_new_blocks(64)`` (wall and thread CPU time): takes the 64 blocks at the head of the free queue, evicting each
  from the hash map. Untimed, those blocks are then cached again under a fresh prompt (hashed
  before the timer starts: vLLM hashes when a request arrives) and freed, so the pool is back
  at N cached blocks and every repeat evicts 64.
* ``get_num_free_blocks()``: vLLM's count of allocatable blocks (cached ones included), the
  counterpart of hybridkv's ``reclaimable()``; 1,000 calls.
* memory per cached block: tracemalloc's net traced bytes over the fill (hash map entries,
  block hash bytes, the per-block hash fields) divided by N; the blocks themselves (one
  ``KVCacheBlock`` per GPU block, created with the pool) are given per block apart.

Run it with the peer's own interpreter; it never imports hybridkv. Install the peer as
benchmarks/vllm_peer_step.py's docstring says (/tmp/vllm_peer), then::

    /tmp/vllm_peer/bin/python benchmarks/vllm_peer_blockpool.py --entries 10000 100000 1000000

``--serve`` (used by bench_prefix_scale.py to interleave with hybridkv): build every pool,
print one JSON line, then for each line ``R`` read from stdin run R repeats on every pool and
print one JSON line with the raw timings.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import tracemalloc

import numpy as np
import vllm
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.request import Request

BLOCK_SIZE, PROMPT_TOKENS, PAGES = 16, 1024, 64
SEED = 1234


class Prompts:
    """Distinct prompts as vLLM requests (token 0 is a serial number)."""

    def __init__(self, seed: int) -> None:
        self.rng, self.next = np.random.default_rng([SEED, seed]), 0
        self.hasher = get_request_block_hasher(BLOCK_SIZE, sha256)
        self.params = SamplingParams(max_tokens=1)

    def request(self, num_blocks: int = PAGES) -> Request:
        tokens = self.rng.integers(0, 50_000, num_blocks * BLOCK_SIZE).tolist()
        tokens[0] = self.next
        self.next += 1
        return Request(f"req-{self.next}", tokens, self.params, None, block_hasher=self.hasher)


def cache_and_free(pool: BlockPool, request: Request, blocks: list) -> None:
    """Give ``blocks`` the request's hashes, then free them in reverse (tail evicted first)."""
    pool.cache_full_blocks(request, blocks, 0, len(blocks), BLOCK_SIZE, 0)
    pool.free_blocks(reversed(blocks))


class CachedPool:
    """A BlockPool whose N free blocks are all cached."""

    def __init__(self, entries: int, memory: bool) -> None:
        self.entries, self.prompts = entries, Prompts(entries)
        gc.collect()
        if memory:
            tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0] if memory else 0
        self.pool = BlockPool(entries + 1, enable_caching=True, hash_block_size=BLOCK_SIZE)
        after_pool = tracemalloc.get_traced_memory()[0] if memory else 0
        t0 = time.perf_counter()
        left = entries
        while left:
            n = min(PAGES, left)
            cache_and_free(self.pool, self.prompts.request(n), self.pool.get_new_blocks(n))
            left -= n
        self.build_s = time.perf_counter() - t0
        gc.collect()
        self.memory = {"bytes_per_entry": None, "bytes_per_block": None}
        if memory:
            net = tracemalloc.get_traced_memory()[0] - after_pool
            tracemalloc.stop()
            self.memory = {"bytes_per_entry": net / entries, "bytes_per_block": (after_pool - before) / (entries + 1)}
        self.check(entries)

    def check(self, cached: int) -> None:
        pool = self.pool
        if len(pool.cached_block_hash_to_block) != cached or pool.get_num_free_blocks() != self.entries:
            raise RuntimeError(f"{len(pool.cached_block_hash_to_block)} cached, {pool.get_num_free_blocks()} free; "
                               f"expected {cached} and {self.entries}")

    def round(self, repeats: int) -> dict:
        alloc_us, alloc_cpu_us = [], []
        for _ in range(repeats):
            request = self.prompts.request()
            gc.collect()
            w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            blocks = self.pool.get_new_blocks(PAGES)
            c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
            alloc_us.append((w1 - w0) / 1e3)
            alloc_cpu_us.append((c1 - c0) / 1e3)
            if len(self.pool.cached_block_hash_to_block) != self.entries - PAGES:
                raise RuntimeError("get_new_blocks(64) did not evict 64 cached blocks")
            cache_and_free(self.pool, request, blocks)
        self.check(self.entries)
        free_us = []
        for _ in range(1000 // max(1, repeats)):
            t0 = time.perf_counter_ns()
            self.pool.get_num_free_blocks()
            free_us.append((time.perf_counter_ns() - t0) / 1e3)
        return {"get_new_blocks_us": alloc_us, "get_new_blocks_cpu_us": alloc_cpu_us, "get_num_free_blocks_us": free_us}


def serve(pools: dict[int, CachedPool]) -> None:
    info = {n: {"entries": n, "build_s": p.build_s, **p.memory} for n, p in pools.items()}
    print(json.dumps({"peer": f"vllm {vllm.__version__}", "pools": info}), flush=True)
    for line in sys.stdin:
        repeats = int(line)
        print(json.dumps({"rounds": {n: p.round(repeats) for n, p in pools.items()}}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--no-memory", action="store_true", help="skip tracemalloc (faster fill)")
    parser.add_argument("--serve", action="store_true", help="build, then one round per stdin line (JSON out)")
    args = parser.parse_args()
    init_none_hash(sha256)
    pools = {n: CachedPool(n, not args.no_memory) for n in args.entries}
    if args.serve:
        serve(pools)
        return
    print(f"vllm {vllm.__version__} BlockPool, prefix caching on, {args.repeats} repeats (medians)")
    print(f"{'N cached':>10} {'fill s':>7} {'get_new_blocks(64) us':>22} {'(CPU us)':>9} "
          f"{'get_num_free_blocks() us':>25} {'B/cached block':>15} {'B/block':>8}")
    for n, p in pools.items():
        r = p.round(args.repeats)
        mem = (f"{p.memory['bytes_per_entry']:>15,.0f} {p.memory['bytes_per_block']:>8,.0f}"
               if p.memory["bytes_per_entry"] is not None else f"{'-':>15} {'-':>8}")
        print(f"{n:>10,} {p.build_s:>7.1f} {statistics.median(r['get_new_blocks_us']):>22,.1f} "
              f"{statistics.median(r['get_new_blocks_cpu_us']):>9,.1f} "
              f"{statistics.median(r['get_num_free_blocks_us']):>25.2f} {mem}")


if __name__ == "__main__":
    main()
