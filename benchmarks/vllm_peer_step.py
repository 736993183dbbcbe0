# mypy: ignore-errors
"""Per-decode-step CPU cost of vLLM's v1 KV-cache manager (the peer baseline).

Workload (as in shared/reference/vllm-baseline.md): one block pool shared by two KV cache
groups, full attention and sliding window 1024; block size 16; 8 KV heads x head size 128,
bf16. B requests with distinct random 2,000-token prompts get their prefill allocated once
(untimed). Then each of N decode steps runs ``new_step_starts()`` and ``allocate_slots(req, 1)``
for every request (timed as "allocate"), reads every request's block ids, and does the
per-request bookkeeping a scheduler does (``num_computed_tokens += 1``, append an output
token, which also extends the request's block hashes when prefix caching is on). The whole
step is timed too. Finally every request is freed (timed). Reported: the median over steps,
then the median over repeats; repeats are interleaved across batch sizes.

Run it with the peer's own interpreter; it never imports hybridkv. Install the peer in a
separate virtual environment (never a project dependency)::

    python3 -m venv /tmp/vllm_peer
    /tmp/vllm_peer/bin/pip install torch==2.13.0
    /tmp/vllm_peer/bin/pip install --no-deps vllm==0.33.0
    /tmp/vllm_peer/bin/pip install packaging numpy psutil pyzmq urllib3 regex msgspec \\
      pydantic cbor2 transformers aiohttp requests openai_harmony openai pillow pybase64 \\
      cachetools cloudpickle uvloop py-cpuinfo prometheus_client xgrammar fastapi \\
      partial_json_parser llguidance

    /tmp/vllm_peer/bin/python benchmarks/vllm_peer_step.py --batch 64 256 1024 --json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import vllm
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    SlidingWindowSpec,
)
from vllm.v1.request import Request, RequestStatus

PROMPT_LEN = 2000
BLOCK_SIZE = 16
SLIDING_WINDOW = 1024
NUM_KV_HEADS = 8
HEAD_SIZE = 128
VOCAB_SIZE = 32000
SEED = 1234


@dataclass
class Run:
    allocate_us: float  # median over steps
    step_us: float  # median over steps
    free_us_per_request: float


def make_manager(batch: int, steps: int, prefix_caching: bool) -> KVCacheManager:
    common: dict[str, Any] = {
        "block_size": BLOCK_SIZE,
        "num_kv_heads": NUM_KV_HEADS,
        "head_size": HEAD_SIZE,
        "dtype": torch.bfloat16,
    }
    sliding = SlidingWindowSpec(sliding_window=SLIDING_WINDOW, **common)
    groups = [
        KVCacheGroupSpec(["full_attn.0"], FullAttentionSpec(**common)),
        KVCacheGroupSpec(["sliding_attn.0"], sliding),
    ]
    per_request = math.ceil((PROMPT_LEN + steps) / BLOCK_SIZE) + 2
    num_blocks = batch * per_request * len(groups) * 11 // 10 + 64  # 10% margin + null block
    config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=groups,
        hash_block_size=BLOCK_SIZE,
    )
    return KVCacheManager(
        config,
        max_model_len=PROMPT_LEN + steps + BLOCK_SIZE,
        scheduler_block_size=BLOCK_SIZE,
        hash_block_size=BLOCK_SIZE,
        enable_caching=prefix_caching,
    )


def make_requests(batch: int, steps: int, repeat: int, prefix_caching: bool) -> list[Request]:
    rng = np.random.default_rng([SEED, repeat, batch])
    prompts = rng.integers(0, VOCAB_SIZE, size=(batch, PROMPT_LEN)).tolist()
    assert len({tuple(p[:BLOCK_SIZE]) for p in prompts}) == batch, "prompts must be distinct"
    # As vLLM's engine does: requests carry a block hasher only when prefix caching is on.
    hasher = get_request_block_hasher(BLOCK_SIZE, sha256) if prefix_caching else None
    params = SamplingParams(max_tokens=steps + 1)
    return [
        Request(f"req-{repeat}-{i}", prompt, params, None, block_hasher=hasher)
        for i, prompt in enumerate(prompts)
    ]


def run_once(batch: int, steps: int, repeat: int, prefix_caching: bool) -> Run:
    manager = make_manager(batch, steps, prefix_caching)
    requests = make_requests(batch, steps, repeat, prefix_caching)
    for req in requests:  # prefill, untimed: the whole prompt at once, then its first token
        if manager.allocate_slots(req, req.num_prompt_tokens) is None:
            raise RuntimeError("block pool too small for prefill")
        req.status = RequestStatus.RUNNING
        req.num_computed_tokens += req.num_prompt_tokens
        req.append_output_token_ids(0)

    allocate_ns: list[int] = []
    step_ns: list[int] = []
    gc.collect()
    for step in range(steps):
        token = step + 1
        t0 = time.perf_counter_ns()
        manager.new_step_starts()
        for req in requests:
            if manager.allocate_slots(req, 1) is None:
                raise RuntimeError("block pool ran short during decode")
        t1 = time.perf_counter_ns()
        _block_ids = [manager.get_block_ids(req.request_id) for req in requests]
        for req in requests:
            req.num_computed_tokens += 1
            req.append_output_token_ids(token)
        t2 = time.perf_counter_ns()
        allocate_ns.append(t1 - t0)
        step_ns.append(t2 - t0)

    t0 = time.perf_counter_ns()
    for req in requests:
        manager.free(req)
    free_ns = time.perf_counter_ns() - t0
    return Run(
        allocate_us=statistics.median(allocate_ns) / 1e3,
        step_us=statistics.median(step_ns) / 1e3,
        free_us_per_request=free_ns / batch / 1e3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefix-caching", choices=["on", "off"], default="on")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    prefix_caching = args.prefix_caching == "on"
    if prefix_caching:
        init_none_hash(sha256)  # vLLM's default prefix-caching hash

    runs: dict[int, list[Run]] = {b: [] for b in args.batch}
    for repeat in range(args.repeats):
        for batch in args.batch:
            runs[batch].append(run_once(batch, args.steps, repeat, prefix_caching))

    results = []
    for batch in args.batch:
        rs = runs[batch]
        results.append(
            {
                "batch": batch,
                "prefix_caching": prefix_caching,
                "allocate_us_per_step_median": statistics.median(r.allocate_us for r in rs),
                "step_us_per_step_median": statistics.median(r.step_us for r in rs),
                "us_per_request_step_median": statistics.median(r.step_us / batch for r in rs),
                "free_us_per_request_median": statistics.median(r.free_us_per_request for r in rs),
            }
        )

    if args.json:
        print(json.dumps({"peer": f"vllm {vllm.__version__}", "results": results}))
        return
    print(
        f"vllm {vllm.__version__}: {args.steps} steps, {args.repeats} repeats, "
        f"prefix caching {args.prefix_caching} (medians, microseconds)"
    )
    print(f"{'B':>6} {'allocate/step':>14} {'step':>10} {'per req-step':>13} {'free/req':>9}")
    for r in results:
        print(
            f"{r['batch']:>6} {r['allocate_us_per_step_median']:>14,.0f}"
            f" {r['step_us_per_step_median']:>10,.0f}"
            f" {r['us_per_request_step_median']:>13.2f} {r['free_us_per_request_median']:>9.2f}"
        )


if __name__ == "__main__":
    main()
