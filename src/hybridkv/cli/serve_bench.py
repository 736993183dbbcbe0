"""``hybridkv serve-bench``: N requests of seeded random lengths through the reference engine at
once (offline serving: every request is submitted at the start), run to the end, then the
throughput, the time to first token (TTFT) and per output token (TPOT) percentiles,
preemptions, suspensions and the prefix-cache hit rate.

Times are what a client sees, on the monotonic clock: a request's TTFT is the moment its first
token comes out of ``Engine.step`` less its submission time, its TPOT is (last token's moment -
first token's) / (outputs - 1) (requests of one output token have none). With overlapped
steps a token comes out one step after the scheduler recorded it. Decoding is greedy, so every
request produces exactly its drawn output length. A progress bar goes to stderr when stderr is
a terminal or with ``--progress``; stdout holds only the report (one JSON object with
``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, NamedTuple

import numpy as np

from hybridkv.cli.generate import add_engine_arguments, cannot_run, check_seed, load_engine_model, make_engine
from hybridkv.cli.specs import parse_tokens
from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_REQUESTS, check_max

PROGRESS_INTERVAL_S = 0.25
BAR_WIDTH = 30
MAX_SHARED_PREFIX = 1 << 20
PERCENTILES = (50, 90, 99)


class LengthRange(NamedTuple):
    """Inclusive bounds of a drawn length (``--prompt-len 16-64``)."""

    low: int
    high: int


def parse_range(text: str, option: str) -> LengthRange:
    """``A-B`` (or a single ``A``) with 1 <= A <= B, token counts such as ``16`` or ``1k``."""
    low_s, dash, high_s = text.partition("-")
    try:
        low = parse_tokens(low_s, option)
        high = parse_tokens(high_s, option) if dash else low
    except ConfigError:
        low = high = 0
    if not 1 <= low <= high:
        raise ConfigError(f"{option}: cannot read range {text!r:.40}; write A-B with 1 <= A <= B, e.g. 16-64")
    return LengthRange(low, high)


def _check_counts(args: argparse.Namespace) -> None:
    for option, value in (("--requests", args.requests), ("--max-batch-size", args.max_batch_size)):
        if value < 1:
            raise ConfigError(f"{option} must be >= 1, got {value}")
        check_max(option, value, MAX_REQUESTS, f"give a smaller {option}")


class _Progress:
    """A throttled ``\\r`` bar of finished requests on stderr (a terminal, or ``--progress``)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.last, self.shown = enabled, total, 0.0, False

    def update(self, done: int, tokens: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < PROGRESS_INTERVAL_S and not force):
            return
        self.last, self.shown = now, True
        filled = BAR_WIDTH * done // self.total
        print(f"\rserve-bench [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{self.total} requests, "
              f"{tokens} tokens out", end="", file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.shown:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def _step(engine: Any, model: str, tokens_out: int) -> Any:
    """One engine step; a model that fails its first step is one the engine cannot run."""
    try:
        return engine.step()
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        if isinstance(e, ConfigError) or tokens_out:
            raise
        raise cannot_run(model, e) from None


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {f"p{q}": round(float(np.percentile(values, q)), 6) for q in PERCENTILES}


def _run(engine: Any, args: argparse.Namespace, prompt: LengthRange, output: LengthRange,
         vocab_size: int) -> dict[str, Any]:
    """Submit the seeded workload, run it to the end; the report's numbers."""
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(prompt.low, prompt.high + 1, args.requests)
    outputs = rng.integers(output.low, output.high + 1, args.requests)
    shared = rng.integers(0, vocab_size, args.shared_prefix)
    progress = _Progress(args.progress or sys.stderr.isatty(), args.requests)
    start = time.monotonic()
    submitted: dict[int, float] = {}
    for p, o in zip(prompts.tolist(), outputs.tolist(), strict=True):
        now = time.monotonic()
        submitted[engine.add_request(np.concatenate([shared, rng.integers(0, vocab_size, p)]), o)] = now
    tokens_out = done = steps = 0
    # when each request's first and last tokens reach the client (the events): with overlapped
    # steps the scheduler records a step before its tokens are read
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    outs: dict[int, int] = {}
    try:
        while engine.has_work:
            events = _step(engine, args.model, tokens_out)
            now = time.monotonic()
            steps += 1
            tokens_out += len(events)
            done += sum(e.finished for e in events)
            for e in events:
                first.setdefault(e.request_id, now)
                outs[e.request_id] = outs.get(e.request_id, 0) + 1
                if e.finished:
                    last[e.request_id] = now
            progress.update(done, tokens_out)
        progress.update(done, tokens_out, force=True)
    finally:
        progress.clear()
    elapsed = time.monotonic() - start
    tracked = [engine.scheduler.requests[i] for i in submitted]
    ttft = [first[i] - submitted[i] for i in submitted if i in first]
    tpot = [(last[i] - first[i]) / (outs[i] - 1) for i in submitted if i in last and outs[i] > 1]
    prompt_tokens = int(prompts.sum()) + args.requests * args.shared_prefix
    prefix_on = engine.config.prefix_cache
    return {
        "requests": args.requests, "completed": sum(t.finish_s is not None for t in tracked),
        "prompt_tokens": prompt_tokens, "output_tokens": tokens_out, "steps": steps,
        "elapsed_s": round(elapsed, 6),
        "output_tokens_per_s": round(tokens_out / elapsed, 3) if elapsed > 0 else None,
        "total_tokens_per_s": round((prompt_tokens + tokens_out) / elapsed, 3) if elapsed > 0 else None,
        "ttft_s": _percentiles(ttft), "tpot_s": _percentiles(tpot),
        "preemptions": engine.scheduler.preemptions, "suspensions": engine.scheduler.suspensions,
        "prefix_cache": prefix_on, "reused_tokens": engine.scheduler.reused_tokens,
        "prefix_hit_rate": round(engine.scheduler.reused_tokens / prompt_tokens, 4) if prefix_on else None,
    }


def _print_report(j: dict[str, Any]) -> None:
    print(f"model {j['model']} on {j['device']} ({j['pools']} pools, max batch {j['max_batch_size']}): "
          f"{j['completed']}/{j['requests']} requests, {j['prompt_tokens']} prompt + {j['output_tokens']} output "
          f"tokens in {j['steps']} steps, {j['elapsed_s']:.3f} s")
    rate = {k: "n/a" if j[k] is None else f"{j[k]:,.1f}" for k in ("output_tokens_per_s", "total_tokens_per_s")}
    print(f"throughput: {rate['output_tokens_per_s']} output tok/s, {rate['total_tokens_per_s']} total tok/s")
    for name, key in (("TTFT", "ttft_s"), ("TPOT", "tpot_s")):
        p = j[key]
        print(f"{name}: " + ("n/a (no request has two outputs)" if p is None else
                             ", ".join(f"{q} {v * 1000:.2f} ms" for q, v in p.items())))
    hit = "off" if j["prefix_hit_rate"] is None else f"{j['prefix_hit_rate']:.1%} ({j['reused_tokens']} tokens)"
    print(f"preemptions {j['preemptions']}, suspensions {j['suspensions']}, prefix-cache hit rate {hit}")


def cmd_serve_bench(args: argparse.Namespace) -> int:
    check_seed(args.seed)
    _check_counts(args)
    prompt = parse_range(args.prompt_len, "--prompt-len")
    output = parse_range(args.output_len, "--output-len")
    if not 0 <= args.shared_prefix <= MAX_SHARED_PREFIX:
        raise ConfigError(f"--shared-prefix must be in [0, {MAX_SHARED_PREFIX}] tokens, got {args.shared_prefix}")
    em = load_engine_model(args.model, args.seed, args.device, args.threads)
    engine = make_engine(em, args, args.shared_prefix + prompt.high + output.high - 1, args.max_batch_size,
                         "--shared-prefix + --prompt-len + --output-len")
    j = {"model": args.model, "device": args.device, "pools": args.pools, "max_batch_size": args.max_batch_size,
         "seed": args.seed, "prompt_len": list(prompt), "output_len": list(output), "shared_prefix": args.shared_prefix,
         **_run(engine, args, prompt, output, em.vocab_size)}
    if args.json:
        print(json.dumps(j, indent=2))
    else:
        _print_report(j)
    return 0


def add_serve_bench_parser(subparsers: Any) -> None:
    """Register ``serve-bench`` on the ``hybridkv`` command's subparsers."""
    s = subparsers.add_parser("serve-bench", help="throughput and latency of N random requests on the engine",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="example: hybridkv serve-bench gemma3_text --requests 32 --prompt-len 16-64")
    add_engine_arguments(s)
    s.add_argument("--requests", type=int, required=True, help="requests to submit (all at the start)")
    s.add_argument("--prompt-len", default="16-64", help="prompt tokens, drawn uniformly from A-B (default 16-64)")
    s.add_argument("--output-len", default="8-32", help="output tokens, drawn uniformly from A-B (default 8-32)")
    s.add_argument("--max-batch-size", type=int, default=8, help="requests running at once (default 8)")
    s.add_argument("--shared-prefix", type=int, default=0,
                   help="tokens every prompt starts with, before its own --prompt-len tokens (default 0): "
                        "what the prefix cache can reuse")
    s.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="turn off prefix reuse (on by default; random prompts rarely share a block)")
    s.add_argument("--progress", action="store_true", help="draw the progress bar on stderr even when not a terminal")
    s.add_argument("--json", action="store_true", help="print one JSON object with every number")
    s.set_defaults(func=cmd_serve_bench)
