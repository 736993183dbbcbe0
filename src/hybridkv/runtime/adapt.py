"""A transformers model made to run on hybridkv's pages (what ``Engine`` does to the model).

- every attention layer gets its K/V page views (``pages.py``) and reaches them through the
  attention function registered as ``"hybridkv"`` (``attention.py``; Zamba2's shared blocks
  learn their layer per call);
- every recurrent layer keeps its state in pages (``recurrent.py``, ``states.py``);
- every MLA layer caches one latent per token (``mla.py``);
- sibling projections of one input (q / k / v, gate / up) run as one GEMM (``projections.py``);
- on a GPU, RMSNorms run through one Triton kernel each (``norms.py``) and the rotary function
  through ``torch.compile`` (``rotary.py``); elsewhere, or when turned off, an earlier
  engine's replacements are undone.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from hybridkv.core.errors import ConfigError
from hybridkv.engine.triton_attention import triton_runs_on
from hybridkv.manager.manager import KVCacheManager
from hybridkv.runtime import attention, mla, norms, projections, recurrent, rotary
from hybridkv.runtime.model import cache_layer_ids, kv_heads, mla_layers, recurrent_layers
from hybridkv.runtime.pages import LayerPages, layer_pages
from hybridkv.runtime.states import state_buffers


class OnPages(NamedTuple):
    layers: dict[int, LayerPages]  # attention layer index -> its pages
    recurrent: bool  # the model has recurrent layers (they walk the packed sequence per request)
    norms: dict[str, str]  # per norm class: the fused form installed, or why it kept its forward
    rotary: list[str]  # the modeling modules whose rotary function runs compiled
    projections: int  # groups of sibling projections run as one GEMM


def onto_pages(model: Any, manager: KVCacheManager, device: Any, fused_norms: bool,
               compiled_rotary: bool, fused_projections: bool) -> OnPages:
    """Route ``model``'s caches through ``manager``'s pages on ``device`` (a torch.device)."""
    dtype = next(model.parameters()).dtype
    # pages and states are the layout's layers; the model's modules know their layer_idx
    attention_ids, state_ids = cache_layer_ids(model)
    heads, states = kv_heads(model), recurrent_layers(model)
    pages = layer_pages(manager, {attention_ids[i]: h for i, h in heads.items()}, dtype)
    buffers = state_buffers(manager, {state_ids[i] for i in states})
    if missing := sorted(i for i in states if state_ids[i] not in buffers):
        raise ConfigError(f"recurrent layers {missing} have no state pages in the plan's layout")
    recurrent.install(model, {i: buffers[state_ids[i]] for i in states})
    mla.install(model, mla_layers(model))  # latents in the pages, up-projections absorbed (mla.py)
    attention.install_shared(model)  # Zamba2's shared block: the call's layer reaches the pages
    attention.register()
    model.set_attn_implementation(attention.ATTENTION_NAME)
    fused: dict[str, str] = {}
    if fused_norms and triton_runs_on(device):
        fused = norms.install(model)
    else:
        norms.uninstall(model)  # (an earlier engine on this model may have fused them)
    compiled: list[str] = []
    if compiled_rotary and device.type == "cuda" and triton_runs_on(device):
        compiled = rotary.install(model)
    else:
        rotary.uninstall(model)
    groups = 0
    if fused_projections:
        groups = projections.install(model)
    else:
        projections.uninstall(model)
    return OnPages({i: pages[attention_ids[i]] for i in heads}, bool(states), fused, compiled, groups)
