"""The reference engine on a CUDA GPU beside transformers' own ``generate``, one run.

    PYTHONPATH=src python3 benchmarks/bench_engine.py [--batch 32 128] [--context 2048] [--steps 32] [--json F]

Model: a Gemma-3-1B-sized text config (26 layers, 5 window-512 layers to 1 full, 4 query
heads on 1 KV head of dim 256, hidden 1152, vocab 262,144) with seeded random weights in
bf16 on the GPU. Per batch size B:

1. **Agreement.** 4 prompts of 64-320 tokens, 128 greedy tokens each: hybridkv's engine in
   bf16 (Triton kernel) against transformers in float32 on the same weights, teacher-forced
   on transformers' tokens so one flip does not cascade: the share of positions whose argmax
   agrees, and the top-1 / top-2 margin where they differ (random weights give flat logits).
2. **Decode throughput.** B prompts of ``--context`` random tokens are prefilled (untimed),
   then ``--steps`` decode steps are timed (CUDA synchronized per step): hybridkv's engine
   (one packed step over its pages), then ``model.generate`` with transformers' default cache
   and attention on the same B prompts (prefill timed separately and subtracted).
3. **Where a step goes.** The scheduler and manager (``schedule`` + ``complete``) and the
   host packing, against the whole step; and the step's bytes (weights once, plus each
   row's visible K/V per layer) against a device-to-device copy measured in the same run
   (the card's usable HBM bandwidth).

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
    """Teacher-forced greedy agreement of the bf16 engine with float32 transformers: for each
    prompt, transformers generates ``steps`` greedy tokens and gives its logits at every
    position in one forward; the engine is asked for the next token after every prefix of
    that sequence (a request per prefix; the prefix cache makes each one a short step)."""
    from hybridkv.runtime.engine import Engine, EngineConfig
    from hybridkv.runtime.model import build_model

    ref = build_model(cfg, seed=0).to(device)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg["vocab_size"], n) for n in (64, 150, 230, 320)]
    seqs, ref_logits = [], []
    with torch.no_grad():
        for p in prompts:
            out = ref.generate(torch.as_tensor(p[None], device=device), max_new_tokens=steps, do_sample=False,
                               min_new_tokens=steps)
            seqs.append(out[0].cpu().numpy())
            ref_logits.append(ref(out).logits[0].float())
    del ref
    model = build_model(cfg, seed=0).to(device=device, dtype=torch.bfloat16)
    eng = Engine(model, EngineConfig(gpu_bytes=1 << 30, host_bytes=0, max_seq_len=1024, max_batch_size=8,
                                     token_budget=2048, prefill_chunk_tokens=512, prefix_cache=True,
                                     keep_logits=True, device=device))
    same, total, margins = 0, 0, []
    for p, full, r in zip(prompts, seqs, ref_logits, strict=True):
        for k in range(p.size, full.size):
            eng.add_request(full[:k], max_new_tokens=1)
            (event,) = list(eng.stream())
            total += 1
            if int(event.logits.argmax()) == int(r[k - 1].argmax()):
                same += 1
            else:
                top = torch.topk(r[k - 1], 2).values
                margins.append(float(top[0] - top[1]))
    return {"positions": total, "agree": same, "agree_share": same / total,
            "ref_top2_margin_where_different_max": max(margins) if margins else 0.0,
            "ref_top2_margin_where_different_median": statistics.median(margins) if margins else 0.0}


def decode_throughput(torch: Any, cfg: dict[str, Any], device: str, batch: int, context: int,
                      steps: int, bandwidth: float) -> dict[str, Any]:
    from hybridkv.runtime.engine import Engine, EngineConfig
    from hybridkv.runtime.model import build_model

    model = build_model(cfg, seed=0).to(device=device, dtype=torch.bfloat16)
    layers, kv_bytes_token = cfg["num_hidden_layers"], 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
    per_req = context + steps + 16
    window = cfg["sliding_window"]
    full_layers = sum(t == "full_attention" for t in cfg["layer_types"])
    # admission reserves each request's peak, its whole prompt in every layer while it is
    # prefilled in one chunk: pages for that, so all B requests run together
    need = batch * layers * (per_req + 16) * kv_bytes_token
    eng = Engine(model, EngineConfig(gpu_bytes=int(need * 1.1) + (64 << 20), host_bytes=0, max_seq_len=per_req,
                                     max_batch_size=batch, token_budget=max(8192, batch),
                                     prefill_chunk_tokens=8192, prefix_cache=False, device=device))
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, cfg["vocab_size"], context) for _ in range(batch)]
    for p in prompts:
        eng.add_request(p, max_new_tokens=steps + 1)
    # prefill until every request decodes
    while any(len(r.outputs) == 0 for r in eng.requests.values()):
        eng.step()
    sync(torch)
    sched_s, step_s = [], []
    sched = eng.scheduler
    orig_schedule, orig_complete = sched.schedule, sched.complete
    spent = [0.0]

    def timed_schedule() -> Any:
        t = time.perf_counter()
        r = orig_schedule()
        spent[0] += time.perf_counter() - t
        return r

    def timed_complete(*a: Any) -> Any:
        t = time.perf_counter()
        r = orig_complete(*a)
        spent[0] += time.perf_counter() - t
        return r

    sched.schedule, sched.complete = timed_schedule, timed_complete  # type: ignore[method-assign]
    rows = []
    for _ in range(steps):
        spent[0] = 0.0
        t = time.perf_counter()
        rows.append(len(eng.step()))
        sync(torch)
        step_s.append(time.perf_counter() - t)
        sched_s.append(spent[0])
    if min(rows) < batch:  # a timed step that did not decode every request measures something else
        raise SystemExit(f"bench_engine: only {min(rows)} of {batch} requests decoded in a timed step")
    step = statistics.median(step_s)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_read = batch * (full_layers * (context + steps // 2) + (layers - full_layers) * min(window, context)) \
        * kv_bytes_token
    hk = {"step_ms": step * 1e3, "tok_s": batch / step, "manager_scheduler_share": statistics.median(
        s / w for s, w in zip(sched_s, step_s, strict=True)),
        "bytes_per_step": weights + kv_read, "roofline_share": (weights + kv_read) / step / (bandwidth / 2)}
    del eng
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
        gen(2)  # warm up
        t1, tn = gen(1), gen(steps + 1)
    hf_step = (tn - t1) / steps
    return {"batch": batch, "context": context, "hybridkv": hk,
            "transformers": {"step_ms": hf_step * 1e3, "tok_s": batch / hf_step}}


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
            hk, hf = r["hybridkv"], r["transformers"]
            print(f"B={b} ctx={c}: hybridkv {hk['step_ms']:.2f} ms/step ({hk['tok_s']:.0f} tok/s, "
                  f"{hk['roofline_share']:.0%} of copy bandwidth, "
                  f"manager+scheduler {hk['manager_scheduler_share']:.1%})"
                  f"; transformers {hf['step_ms']:.2f} ms/step ({hf['tok_s']:.0f} tok/s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
