"""How much of a decode graph's GPU time torch.compile of transformers' own code saves.

    PYTHONPATH=src python3 benchmarks/probe_compile.py [BATCH] [CONTEXT]

The engine and requests are ``bench_engine.py``'s (Gemma-3-1B-sized, bf16, BATCH requests of
CONTEXT tokens all decoding; default 128 at 2048). The decode graph is recaptured and timed
(one replay's GPU time between CUDA events, and a step with overlap) for each variant:

- ``base``: RMSNorms fused; the rotary function and the projections as transformers has them
  (``compiled_rotary`` and ``fused_projections`` undone);
- ``rope``: the rotary function compiled (``runtime/rotary.py``, ``compiled_rotary=True``);
- ``rope+mlp``: each MLP module compiled too;
- ``layers``: every decoder layer's forward compiled whole (its norms unfused, so inductor
  fuses them with the residual adds), the attention call left out of the compiled graphs.

Each variant's logits are checked against the same static step run without compilation.
Needs a CUDA device.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

from bench_engine import GEMMA3_1B, prefilled_engine, replay_gpu_ms, sync, timed_steps


def main() -> int:
    import torch
    from transformers import AttentionInterface

    from hybridkv.runtime import attention, norms, projections, rotary

    if not torch.cuda.is_available():
        print("probe_compile: needs a CUDA device", file=sys.stderr)
        return 2
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    context = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "batch": batch, "context": context}
    model, eng, _, _ = prefilled_engine(torch, GEMMA3_1B, "cuda", batch, context, 12)
    eng.step()
    eng.drain()
    size = min(s for s in eng.graphs.sizes if s >= batch)
    layers = list(model.model.layers)
    own_forward = [layer.forward for layer in layers]
    own_mlp = [layer.mlp for layer in layers]
    compiled_mlp = [torch.compile(m, dynamic=True) for m in own_mlp]
    compiled_forward: list[Any] = []

    def plain() -> None:
        rotary.uninstall(model)
        projections.uninstall(model)
        for layer, forward, mlp in zip(layers, own_forward, own_mlp, strict=True):
            layer.forward, layer.mlp = forward, mlp

    def apply(name: str) -> None:
        plain()
        if name in ("rope", "rope+mlp"):
            rotary.install(model)
        if name == "rope+mlp":
            for layer, mlp in zip(layers, compiled_mlp, strict=True):
                layer.mlp = mlp
        if name == "layers":
            for layer, forward in zip(layers, compiled_forward, strict=True):
                layer.forward = forward

    def measure(name: str) -> None:
        eng.drain()
        eng.graphs.reset()
        apply(name)
        t = time.perf_counter()
        eng.step()  # compiles (warm-up) and captures
        eng.drain()
        sync(torch)
        capture_s = time.perf_counter() - t
        replay = replay_gpu_ms(torch, eng, batch)
        mine = eng.graphs.graphs[size][1][:batch].float().clone()
        plain()
        with torch.no_grad():
            ref = eng.graphs._forward(size)[:batch].float()  # the same static step, nothing compiled
        apply(name)
        step = timed_steps(torch, eng, 12, batch, runs=3)["step_ms"]
        out[name] = {"replay_ms": replay, "step_ms": step, "capture_s": capture_s, "failed": eng.graphs.failed,
                     "max_dlogit_vs_uncompiled": float((mine - ref).abs().max()), "logit_std": float(ref.std())}
        print(name, out[name], flush=True)

    for name in ("base", "rope", "rope+mlp"):
        try:
            measure(name)
        except Exception:
            traceback.print_exc()
    try:
        norms.uninstall(model)
        AttentionInterface.register(attention.ATTENTION_NAME, torch.compiler.disable(attention.hybridkv_attention))
        compiled_forward.extend(torch.compile(f, dynamic=True) for f in own_forward)
        measure("layers")
    except Exception:
        traceback.print_exc()
    finally:
        attention.register()
    with open(os.path.join(os.environ.get("OUT", "."), f"compile_{batch}_{context}.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
