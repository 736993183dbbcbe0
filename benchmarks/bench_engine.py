"""The reference engine on a CUDA GPU beside transformers' own ``generate``, one run.

    PYTHONPATH=src python3 benchmarks/bench_engine.py [--batch 32 128] [--context 2048] [--steps 32] [--json F]

Model: a Gemma-3-1B-sized text config (26 layers, 5 window-512 layers to 1 full, 4 query
heads on 1 KV head of dim 256, hidden 1152, vocab 262,144) with seeded random weights in
bf16 on the GPU. Per batch size B:

1. **Agreement.** 4 prompts of 64-320 tokens, 128 greedy tokens each: hybridkv's engine in
   bf16 (Triton kernels, decode steps from CUDA graphs) against transformers in float32 on
   the same weights, teacher-forced on the engine's tokens so one flip does not cascade: the
   share of positions where transformers picks the engine's token, and the top-1 / top-2
   margin where they differ (random weights give flat logits).
2. **Decode throughput.** B prompts of ``--context`` random tokens are prefilled, then three
   runs of ``--steps`` decode steps are timed (CUDA synchronized around each run, the median
   run): hybridkv's engine as it runs by default on a GPU (decode steps replayed from a CUDA
   graph, RMSNorms fused, the rotary function compiled, q / k / v and gate / up as one GEMM
   each, the next step scheduled while the GPU runs this one), then the same requests without
   overlap, with transformers' own modules (graphs recaptured over its norms, rotary function
   and projections) and with one eager forward per step; then ``model.generate`` with transformers' default cache
   and attention on the same B prompts ((prefill + steps) minus prefill alone).
3. **Where a step goes.** The scheduler and manager (``schedule`` + ``complete``) and the
   host packing, as shares of the step; the share of the step the GPU waits for the host (one
   replay's GPU time against the step); and the step's bytes (weights once, plus each row's
   visible K/V per layer) per second against a device-to-device copy measured in the same run
   (bytes read and written: the card's usable HBM bandwidth).

``--tiny`` runs a 2-layer config on the CPU (checks the script, measures nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np

GEMMA3_1B: dict[str, Any] = {
    "model_type": "gemma3_text", "vocab_size": 262_144, "hidden_size": 1152, "intermediate_size": 6912,
    "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "sliding_window": 512, "query_pre_attn_scalar": 256, "max_position_embeddings": 32_768,
    "rope_theta": 1_000_000.0,
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)],
}
TINY: dict[str, Any] = {**GEMMA3_1B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "head_dim": 16, "sliding_window": 8,
                        "layer_types": ["sliding_attention", "full_attention"]}


def sync(torch: Any) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def save_json(path: str | None, out: dict[str, Any]) -> None:
    """Write ``out`` to ``path`` (nothing without one)."""
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def copy_bandwidth(torch: Any, device: str) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write), median of 10."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        sync(torch)
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * (1 << 30) / statistics.median(times)


def agreement(torch: Any, cfg: dict[str, Any], device: str, steps: int) -> dict[str, Any]:
    """Greedy agreement of the bf16 engine with float32 transformers on the same weights: the
    engine generates ``steps`` tokens for 4 prompts together (its decode steps replayed from
    CUDA graphs on a GPU); transformers, given each generated sequence in one forward, says
    which token it would pick at every position. Teacher-forced on the engine's tokens, so
    one flip does not cascade; where they differ, the reference's top-1 / top-2 margin (random
    weights give flat logits)."""
    from hybridkv.runtime.engine import Engine, EngineConfig
    from hybridkv.runtime.model import build_model

    ref = build_model(cfg, seed=0).to(device)
    model = build_model(cfg, seed=0).to(device=device, dtype=torch.bfloat16)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg["vocab_size"], n) for n in (64, 150, 230, 320)]
    eng = Engine(model, EngineConfig(gpu_bytes=1 << 30, host_bytes=0, max_seq_len=1024, max_batch_size=8,
                                     token_budget=2048, prefill_chunk_tokens=512, device=device))
    outputs = eng.generate(prompts, max_new_tokens=steps)
    same, total, margins = 0, 0, []
    with torch.no_grad():
        for p, out in zip(prompts, outputs, strict=True):
            seq = torch.as_tensor(np.concatenate([p, out]), device=device)
            logits = ref(seq[None]).logits[0, p.size - 1:-1].float()  # row k predicts output k
            got = torch.as_tensor(out, device=device)
            agree = logits.argmax(dim=-1) == got
            same, total = same + int(agree.sum()), total + len(out)
            top = torch.topk(logits[~agree], 2).values
            margins += (top[:, 0] - top[:, 1]).tolist()
    return {"positions": total, "agree": same, "agree_share": same / total, "graph_steps": eng.graph_steps,
            "ref_top2_margin_where_different_max": max(margins) if margins else 0.0,
            "ref_top2_margin_where_different_median": statistics.median(margins) if margins else 0.0}


RUNS = 3  # timed runs per variant
# decode steps each request must have room for, in units of --steps: RUNS runs of each of the
# 4 variants, plus one for the captures
ROOM = 4 * RUNS + 1


def timed_steps(torch: Any, eng: Any, steps: int, batch: int, runs: int = RUNS) -> dict[str, float]:
    """``runs`` runs of ``steps`` decode steps, the device synchronized only around each run (an
    engine with overlap keeps the device busy across steps, as it does serving): the median
    over runs of the time per step and of the shares of the scheduler and manager
    (``schedule`` + ``complete``) and of the host packing in it."""
    from hybridkv.runtime import engine as engine_module

    sched = eng.scheduler
    spent = {"sched": 0.0, "pack": 0.0}
    saved = {"pack": engine_module.pack}

    def timed(orig: Any, key: str) -> Any:
        def run(*a: Any) -> Any:
            t = time.perf_counter()
            r = orig(*a)
            spent[key] += time.perf_counter() - t
            return r
        return run

    sched.schedule, sched.complete = timed(sched.schedule, "sched"), timed(sched.complete, "sched")
    engine_module.pack = timed(saved["pack"], "pack")
    step_s, sched_share, pack_share, rows = [], [], [], []
    graph_steps = eng.graph_steps
    try:
        for _ in range(runs):
            spent["sched"] = spent["pack"] = 0.0
            sync(torch)
            t = time.perf_counter()
            for _ in range(steps):
                rows.append(len(eng.step()))
            sync(torch)
            total = time.perf_counter() - t
            step_s.append(total / steps)
            sched_share.append(spent["sched"] / total)
            pack_share.append(spent["pack"] / total)
    finally:
        del sched.schedule, sched.complete  # the instance attributes; the methods show through again
        engine_module.pack = saved["pack"]
    if min(rows) < batch:  # a timed step that did not decode every request measures something else
        raise SystemExit(f"bench_engine: only {min(rows)} of {batch} requests decoded in a timed step")
    return {"step_ms": statistics.median(step_s) * 1e3, "tok_s": batch / statistics.median(step_s),
            "manager_scheduler_share": statistics.median(sched_share),
            "pack_share": statistics.median(pack_share), "graph_steps": eng.graph_steps - graph_steps}


def replay_gpu_ms(torch: Any, eng: Any, batch: int, repeats: int = 20) -> float:
    """Median GPU time of one replay of the graph a step of ``batch`` rows uses (the last
    step's inputs again: its K/V rewritten with the same values), between CUDA events."""
    graph, _ = eng.graphs.graphs[min(s for s in eng.graphs.graphs if s >= batch)]
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        sync(torch)
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def set_overlap(eng: Any, on: bool) -> None:
    """Switch overlapped steps between runs (the step in flight read first)."""
    eng.drain()
    eng.overlap = on


def prefilled_engine(torch: Any, cfg: dict[str, Any], device: str, batch: int, context: int,
                     steps: int) -> tuple[Any, Any, list[Any], float]:
    """The bf16 model, an engine holding ``batch`` requests of ``context`` random tokens all
    decoding (room for ``ROOM * steps`` more each), their prompts, and the prefill's seconds."""
    from hybridkv.runtime.engine import Engine, EngineConfig
    from hybridkv.runtime.model import build_model

    model = build_model(cfg, seed=0).to(device=device, dtype=torch.bfloat16)
    layers, kv_bytes_token = cfg["num_hidden_layers"], 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
    # the first requests decode while the last are prefilled (8192 prompt tokens a step): room
    # for those tokens too, so every request still decodes in every timed step
    prefill_steps = -(-batch * context // 8192)
    per_req = context + ROOM * steps + 16 + prefill_steps
    # admission reserves each request's peak, its whole prompt in every layer while it is
    # prefilled in one chunk: pages for that, so all B requests run together
    need = batch * layers * (per_req + 16) * kv_bytes_token
    eng = Engine(model, EngineConfig(gpu_bytes=int(need * 1.1) + (64 << 20), host_bytes=0, max_seq_len=per_req,
                                     max_batch_size=batch, token_budget=max(8192, batch),
                                     prefill_chunk_tokens=8192, prefix_cache=False, device=device,
                                     decode_graphs="auto" if device == "cuda" else "eager"))
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, cfg["vocab_size"], context) for _ in range(batch)]
    for p in prompts:
        eng.add_request(p, max_new_tokens=ROOM * steps + prefill_steps + 8)
    t0 = time.perf_counter()
    while any(len(r.outputs) == 0 for r in eng.requests.values()):
        eng.step()
    sync(torch)
    return model, eng, prompts, time.perf_counter() - t0


def decode_throughput(torch: Any, cfg: dict[str, Any], device: str, batch: int, context: int,
                      steps: int, bandwidth: float) -> dict[str, Any]:
    from hybridkv.runtime import norms, projections, rotary

    model, eng, prompts, prefill_s = prefilled_engine(torch, cfg, device, batch, context, steps)
    layers, kv_bytes_token = cfg["num_hidden_layers"], 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
    window = cfg["sliding_window"]
    full_layers = sum(t == "full_attention" for t in cfg["layer_types"])
    t0 = time.perf_counter()
    eng.step()  # captures the graph of this batch size
    sync(torch)
    capture_s = time.perf_counter() - t0
    graphs = timed_steps(torch, eng, steps, batch)
    replay_ms = replay_gpu_ms(torch, eng, batch) if eng.graphs is not None and eng.graphs.graphs else None
    # the same requests stepping one after another (the host reads each step's tokens before
    # scheduling the next), then with transformers' own modules (recaptured: norms unfused,
    # rotary uncompiled, projections one GEMM each), then one eager forward per step
    set_overlap(eng, False)
    sequential = timed_steps(torch, eng, steps, batch)
    set_overlap(eng, device == "cuda")
    norms.uninstall(model)
    rotary.uninstall(model)
    projections.uninstall(model)
    if eng.graphs is not None:
        eng.graphs.reset()
    eng.step()
    own_modules = timed_steps(torch, eng, steps, batch)
    if replay_ms is not None:
        own_modules["replay_gpu_ms"] = replay_gpu_ms(torch, eng, batch)
    eng.drain()
    eng.graphs, saved = None, eng.graphs
    eager = timed_steps(torch, eng, steps, batch)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_read = batch * (full_layers * (context + steps) + (layers - full_layers) * min(window, context)) \
        * kv_bytes_token
    for r in (graphs, sequential, own_modules, eager):
        r["roofline_share"] = (weights + kv_read) / (r["step_ms"] / 1e3) / bandwidth
    if replay_ms is not None:  # the share of a step the GPU waits for the host
        graphs["replay_gpu_ms"] = replay_ms
        graphs["host_exposed_share"] = max(0.0, 1.0 - replay_ms / graphs["step_ms"])
        sequential["host_exposed_share"] = max(0.0, 1.0 - replay_ms / sequential["step_ms"])
    hk = {"graphs": graphs, "sequential": sequential, "graphs_own_modules": own_modules, "eager": eager,
          "fused_norms": eng.norms, "compiled_rotary": eng.rotary, "fused_projections": eng.projections,
          "bytes_per_step": weights + kv_read, "prefill_s": prefill_s,
          "first_decode_step_with_capture_s": capture_s, "capture_failed": saved.failed if saved else "no graphs"}
    del eng, saved
    if device == "cuda":
        torch.cuda.empty_cache()
    model.set_attn_implementation("sdpa")  # the engine switched it to its own
    # transformers generate on the same prompts: (prefill + steps) minus prefill alone
    ids = torch.as_tensor(np.stack(prompts), device=device)
    with torch.no_grad():
        def gen(n: int) -> float:
            sync(torch)
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            sync(torch)
            return time.perf_counter() - t
        try:
            gen(2)  # warm up
            t1, tn = gen(1), gen(steps + 1)
            hf_step = (tn - t1) / steps
            hf: dict[str, Any] = {"step_ms": hf_step * 1e3, "tok_s": batch / hf_step}
        except torch.cuda.OutOfMemoryError as e:  # its prefill materializes B x context x context masks
            hf = {"error": f"out of memory: {str(e).splitlines()[0]}"}
    return {"batch": batch, "context": context, "hybridkv": hk, "transformers": hf}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--context", type=int, nargs="+", default=[2048])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--agree-steps", type=int, default=128)
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="2-layer config on the CPU: checks the script only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    cfg = TINY if args.tiny else GEMMA3_1B
    if not args.tiny and not torch.cuda.is_available():
        print("bench_engine: needs a CUDA device (or --tiny on the CPU)", file=sys.stderr)
        return 2
    device = "cpu" if args.tiny else "cuda"
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    out["copy_bytes_per_s"] = copy_bandwidth(torch, device) if device == "cuda" else 1e9
    if not args.skip_agreement:
        out["agreement"] = agreement(torch, cfg, device, args.agree_steps)
        print(f"agreement: {out['agreement']}", flush=True)
    out["decode"] = []
    for b in args.batch:
        for c in args.context:
            r = decode_throughput(torch, cfg, device, b, c, args.steps, out["copy_bytes_per_s"])
            out["decode"].append(r)
            if device == "cuda":
                torch.cuda.empty_cache()  # the model and its pages are gone; free them for the next row
            hk, hf = r["hybridkv"], r["transformers"]
            g, q, e, own = hk["graphs"], hk["sequential"], hk["eager"], hk["graphs_own_modules"]
            replay = f", replay {g['replay_gpu_ms']:.2f} ms" if "replay_gpu_ms" in g else ""
            own_replay = f" (replay {own['replay_gpu_ms']:.2f} ms)" if "replay_gpu_ms" in own else ""
            base = f"{hf['step_ms']:.2f} ms/step ({hf['tok_s']:.0f} tok/s)" if "step_ms" in hf else hf["error"]
            exposed = f", GPU waits for the host {g['host_exposed_share']:.1%}" if "host_exposed_share" in g else ""
            print(f"B={b} ctx={c}: default {g['step_ms']:.2f} ms/step ({g['tok_s']:.0f} tok/s, "
                  f"{g['roofline_share']:.0%} of copy bandwidth, manager+scheduler {g['manager_scheduler_share']:.1%}, "
                  f"packing {g['pack_share']:.1%}{exposed}{replay}); without overlap {q['step_ms']:.2f} ms; "
                  f"transformers' modules {own['step_ms']:.2f} ms{own_replay}; eager {e['step_ms']:.2f} ms; "
                  f"transformers {base}; prefill {hk['prefill_s']:.1f} s; capture failed: {hk['capture_failed']}",
                  flush=True)
            save_json(args.json, out)  # after every row: a run cut short keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
