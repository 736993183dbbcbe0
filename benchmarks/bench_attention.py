"""Decode attention over hybridkv's pages on a CUDA GPU: the Triton kernel against the card's
own copy bandwidth, and the torch reference beside it.

    python benchmarks/bench_attention.py [--batch 32 128 256] [--context 2048 8192] [--json FILE] [--sweep]

One Gemma-3-1B attention layer (4 query heads on 1 KV head, head dim 256, scale 256**-0.5,
bf16), 16-token pages scattered at random over a slot-major pool whose slots hold
``--layers-per-slot`` layers' K and V pages (so a layer's pages are strided views, the slot
stride larger than one page), the layer read as the engine reads it. Each row decodes one
token at position ``context - 1``; with the 512-token window the stale blocks are ``-1``.

Per (batch, context, mask): the kernel's median GPU time per call between CUDA events (L2
flushed before each call, so K/V come from HBM), the bytes it must read (the visible keys'
K and V, their block-table entries, q) and write (out), the achieved GB/s and its fraction of
a device-to-device copy of 1 GiB measured in the same run (read + write bytes). The torch
reference's time and the largest difference from it when ``hybridkv.engine.paged_attention``
is importable. ``--sweep`` also times other cuts (``KernelTiles``) and reports the fastest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from hybridkv.engine import triton_attention as ta

HEADS_Q, HEADS_KV, HEAD_DIM, WINDOW, TPB = 4, 1, 256, 512, 16  # Gemma-3-1B
SCALE = 256 ** -0.5  # query_pre_attn_scalar = 256


def gpu_time(fn: Callable[[], Any], repeats: int, flush: torch.Tensor) -> float:
    """Median seconds of one ``fn()`` between CUDA events, L2 flushed before each."""
    times = []
    for _ in range(repeats + 2):
        flush.zero_()  # 2 GiB: evicts the 60 MB L2, and keeps the GPU busy while the host launches the call
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times[2:])


def copy_bandwidth(flush: torch.Tensor) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB, counting bytes read and written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    t = gpu_time(lambda: dst.copy_(src), 10, flush)
    return 2 * src.numel() / t


class Layer:
    """One attention layer's pages in a slot-major pool, and a step over ``batch`` rows that
    each compute their last ``queries`` positions (1: decode; more: a prefill chunk)."""

    def __init__(self, batch: int, context: int, layers_per_slot: int, window: int | None, seed: int,
                 queries: int = 1) -> None:
        g = torch.Generator(device="cuda").manual_seed(seed)
        blocks = -(-context // TPB)
        page = TPB * HEADS_KV * HEAD_DIM
        slot_elems = layers_per_slot * 2 * page  # K and V of every layer of the slot
        num_slots = batch * blocks
        self.pool = torch.randn(num_slots * slot_elems, device="cuda", dtype=torch.bfloat16, generator=g)
        shape, strides = (num_slots, TPB, HEADS_KV, HEAD_DIM), (slot_elems, HEADS_KV * HEAD_DIM, HEAD_DIM, 1)
        self.k = self.pool.as_strided(shape, strides, 0)  # layer 0: K page, then V page
        self.v = self.pool.as_strided(shape, strides, page)
        perm = torch.randperm(num_slots, device="cuda", generator=g)
        self.table = perm.view(batch, blocks).to(torch.int32)
        first = context - queries
        if window is not None:  # stale blocks: every token older than the first query's window
            self.table[:, : max(0, first - window + 1) // TPB] = -1
        self.q = torch.randn(batch * queries, HEADS_Q, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
        self.q_row = torch.arange(batch, device="cuda").repeat_interleave(queries)
        self.q_pos = (first + torch.arange(queries, device="cuda")).repeat(batch)
        self.kv_len = torch.full((batch,), context, device="cuda")
        seen = [min(p + 1, window) if window is not None else p + 1 for p in range(first, context)]
        self.flops = batch * 2 * HEADS_Q * 2 * HEAD_DIM * sum(seen)  # QK^T and PV over the visible pairs
        self.window = window
        visible = min(context, window) if window is not None else context
        kv_bytes = batch * visible * HEADS_KV * 2 * HEAD_DIM * 2
        table_bytes = batch * (-(-visible // TPB) + 1) * 4
        self.bytes = kv_bytes + table_bytes + 2 * self.q.numel() * 2  # + q read + out written

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.k, self.v, self.table, self.q_row, self.q_pos, self.kv_len

    def default_cut(self) -> ta.KernelTiles:
        return ta.default_tiles(self.q, self.k, self.v, self.table, self.window, 0, None)

    def triton(self, tiles: ta.KernelTiles | None = None) -> torch.Tensor:
        if tiles is None:
            return ta.paged_attention_triton(*self.args(), scale=SCALE, window=self.window)
        return ta.launch(*self.args(), tiles, scale=SCALE, window=self.window, sink_tokens=0, chunk=None,
                         softcap=None, sinks=None)


def sweep_cuts() -> list[ta.KernelTiles]:
    cuts = [ta.KernelTiles(1, n, s, num_warps=4) for n in (32, 64, 128) for s in (1, 2, 4, 8, 16, 32)]
    cuts += [ta.KernelTiles(1, 64, s, num_warps=8) for s in (1, 4, 16)]
    return cuts + [ta.KernelTiles(1, 64, s, num_warps=4, num_stages=st) for s in (1, 4, 16) for st in (1, 3)]


def cut_name(c: ta.KernelTiles) -> str:
    return f"n{c.block_n}/s{c.num_splits}/w{c.num_warps}/st{c.num_stages}"


def host_us(fn: Callable[[], Any], calls: int = 50) -> float:
    """Host microseconds per call, back to back (what the step's CPU spends launching)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def measure(layer: Layer, repeats: int, flush: torch.Tensor, copy_bps: float, sweep: bool,
            reference: Callable[..., torch.Tensor] | None) -> dict[str, Any]:
    out = layer.triton()
    t = gpu_time(layer.triton, repeats, flush)
    row: dict[str, Any] = {"us": t * 1e6, "bytes": layer.bytes, "gb_per_s": layer.bytes / t / 1e9,
                           "fraction_of_copy": layer.bytes / t / copy_bps, "host_us": host_us(layer.triton),
                           "cut": cut_name(layer.default_cut())}
    if sweep:
        timed = [(gpu_time(lambda c=c: layer.triton(c), repeats, flush), c) for c in sweep_cuts()]
        best_t, best = min(timed, key=lambda x: x[0])
        row.update(best_us=best_t * 1e6, best_fraction_of_copy=layer.bytes / best_t / copy_bps,
                   best_cut=cut_name(best), sweep_us={cut_name(c): round(x * 1e6, 1) for x, c in timed})
    if reference is not None:
        want = reference(*layer.args(), scale=SCALE, window=layer.window)
        row["max_abs_diff_vs_reference"] = float((out.float() - want.float()).abs().max())
        row["reference_us"] = gpu_time(lambda: reference(*layer.args(), scale=SCALE, window=layer.window),
                                       3, flush) * 1e6
    return row


def prefill_row(rows: int, context: int, window: int | None, args: argparse.Namespace,
                flush: torch.Tensor) -> dict[str, Any]:
    layer = Layer(rows, context, args.layers_per_slot, window, seed=context, queries=min(args.prefill_chunk, context))
    layer.triton()
    t = gpu_time(layer.triton, args.repeats, flush)
    return {"rows": rows, "chunk": layer.q.shape[0] // rows, "context": context,
            "mask": "full" if window is None else f"window {window}", "us": t * 1e6, "tflops": layer.flops / t / 1e12}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--context", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--layers-per-slot", type=int, default=2, help="layers whose pages share a slot (stride)")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median)")
    ap.add_argument("--sweep", action="store_true", help="also time other cuts of the kernel, report the fastest")
    ap.add_argument("--no-reference", action="store_true", help="skip the torch reference")
    ap.add_argument("--prefill-chunk", type=int, default=0, metavar="N",
                    help="also time prefill chunks of N tokens (1 and 4 rows) at each context")
    ap.add_argument("--json", metavar="FILE", help="write the rows as JSON ('-' for stdout)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if not ta.triton_available():
        print("bench_attention: needs triton (pip install triton)", file=sys.stderr)
        return 2
    reference = None
    if not args.no_reference:
        try:
            from hybridkv.engine.paged_attention import paged_attention as reference
        except ImportError:
            print("bench_attention: hybridkv.engine.paged_attention not importable; no reference column")
    flush = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    copy_bps = copy_bandwidth(flush)
    rows = []
    for batch in args.batch:
        for context in args.context:
            for window in (WINDOW, None):
                layer = Layer(batch, context, args.layers_per_slot, window, seed=batch + context)
                row = {"batch": batch, "context": context, "mask": "full" if window is None else f"window {window}",
                       **measure(layer, args.repeats, flush, copy_bps, args.sweep, reference)}
                rows.append(row)
                del layer
                torch.cuda.empty_cache()
    print_table(rows, copy_bps)
    prefill = [prefill_row(rows_, context, window, args, flush) for rows_ in (1, 4) for context in args.context
               for window in (WINDOW, None)] if args.prefill_chunk else []
    for r in prefill:
        print(f"prefill {r['rows']} x {r['chunk']} tokens at {r['context']:>5}, {r['mask']:>10}: {r['us']:8.1f} us, "
              f"{r['tflops']:6.1f} TFLOP/s")
    if args.json:
        doc = {"device": torch.cuda.get_device_name(), "copy_gb_per_s": copy_bps / 1e9, "torch": torch.__version__,
               "layer": {"q_heads": HEADS_Q, "kv_heads": HEADS_KV, "head_dim": HEAD_DIM, "tokens_per_block": TPB,
                         "dtype": "bfloat16", "layers_per_slot": args.layers_per_slot}, "rows": rows,
               "prefill": prefill}
        text = json.dumps(doc, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


def print_table(rows: list[dict[str, Any]], copy_bps: float) -> None:
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_bps / 1e9:.0f} GB/s (read + write)")
    print(f"{'batch':>5} {'context':>7} {'mask':>10} {'us':>8} {'GB/s':>7} {'of copy':>7} {'host us':>7} "
          f"{'best us':>8} {'ref us':>9} {'max |diff|':>10}  cut")
    for r in rows:
        best = f"{r['best_us']:8.1f}" if "best_us" in r else f"{'-':>8}"
        ref = f"{r['reference_us']:9.0f}" if "reference_us" in r else f"{'-':>9}"
        diff = f"{r['max_abs_diff_vs_reference']:10.2e}" if "reference_us" in r else f"{'-':>10}"
        print(f"{r['batch']:>5} {r['context']:>7} {r['mask']:>10} {r['us']:8.1f} {r['gb_per_s']:7.0f} "
              f"{r['fraction_of_copy']:7.0%} {r['host_us']:7.1f} {best} {ref} {diff}  {r['cut']}")


if __name__ == "__main__":
    raise SystemExit(main())
