"""Multi-head latent attention (DeepSeek-V3) over latent pages, with the up-projections absorbed.

transformers' ``DeepseekV3Attention`` decompresses every cached latent into per-head keys and
values before it calls the attention function, so the function would see (and a cache of what
it sees would hold) ``heads x (nope + rope + v)`` values per token instead of the layout's
``kv_lora_rank + qk_rope_head_dim``. The engine replaces the module's forward instead:

    c_kv = kv_a_layernorm(kv_a_proj_with_mqa(h)[:rank])      k_pe = RoPE(kv_a_proj_with_mqa(h)[rank:])
    pages  <-  [c_kv ; k_pe]                                   one latent head per token
    q = q_b(q_a_norm(q_a(h))) or q_proj(h)  ->  q_nope, q_pe = RoPE(q_pe)
    q_lat = q_nope @ W_UK  (per head: nope -> rank)            query [q_lat ; q_pe], rank + rope wide
    o_lat = paged attention (1 KV head, D = rank + rope, Dv = rank: V is the latent's first rank channels)
    out = o_proj(o_lat @ W_UV^T per head)

with ``kv_b_proj.weight`` cut per head into ``W_UK`` (its first ``qk_nope_head_dim`` rows)
and ``W_UV`` (the next ``v_head_dim``). ``q_nope . (W_UK c)`` equals ``(q_nope W_UK) . c``,
and the probabilities' sum of ``W_UV c`` equals ``W_UV`` applied to their sum of ``c``, so
the logits and outputs are the decompressed ones; the softmax scale is the module's own
(``qk_head_dim ** -0.5``, times yarn's ``mscale`` squared when the config scales RoPE).
RoPE is the module's own function at the step's positions (the model's rotary embedding of
``position_ids``), interleaved or not as ``config.rope_interleave`` says.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hybridkv.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

_PARTS = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj", "kv_lora_rank", "qk_nope_head_dim",
          "qk_rope_head_dim", "v_head_dim", "num_heads", "scaling")


def _rotary(module: Any) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The model's own RoPE function (from the module's file), in its pair convention."""
    source = sys.modules[type(module).__module__]
    name = "apply_rotary_pos_emb_interleave" if getattr(module.config, "rope_interleave", False) \
        else "apply_rotary_pos_emb"
    fn = getattr(source, name, None)
    if fn is None:
        raise ConfigError(f"layer {module.layer_idx} ({type(module).__name__}): no {name} in {source.__name__}")
    return fn  # type: ignore[no-any-return]


def mla_forward(module: Any, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: Any = None, past_key_values: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention module's forward over the step's latent pages: ``[1, T, hidden]`` in and out."""
    import torch

    from hybridkv.runtime.attention import step_context

    step = step_context(kwargs, f"MLA layer {module.layer_idx} keeps its latents in hybridkv pages",
                        hidden_states.shape[0])
    heads, nope, rope = module.num_heads, module.qk_nope_head_dim, module.qk_rope_head_dim
    rank, dv, t = module.kv_lora_rank, module.v_head_dim, hidden_states.shape[1]
    layer = step.layers[module.layer_idx]
    table = step.tables[layer.layer_group]

    if module.q_lora_rank is None:
        q = module.q_proj(hidden_states)
    else:
        q = module.q_b_proj(module.q_a_layernorm(module.q_a_proj(hidden_states)))
    q = q.view(1, t, heads, nope + rope).transpose(1, 2)  # [1, H, T, nope + rope]
    q_nope, q_pe = torch.split(q, [nope, rope], dim=-1)
    c_kv, k_pe = torch.split(module.kv_a_proj_with_mqa(hidden_states), [rank, rope], dim=-1)
    c_kv = module.kv_a_layernorm(c_kv)
    cos, sin = position_embeddings
    q_pe, k_pe = module.hybridkv_rotary(q_pe, k_pe.view(1, 1, t, rope), cos, sin)

    latent = torch.cat([c_kv[0], k_pe[0, 0]], dim=-1)[:, None]  # [T, 1, rank + rope]
    v_pages = layer.k[..., :rank]  # V: the latent's first rank channels, no copy
    step.write(layer.k, v_pages, table, step.q_row, step.q_pos, latent, latent[..., :rank])

    w = module.kv_b_proj.weight.view(heads, nope + dv, rank)
    w_uk, w_uv = w[:, :nope], w[:, nope:]  # [H, nope, rank], [H, dv, rank]
    q_lat = torch.einsum("htn,hnr->thr", q_nope[0], w_uk)  # absorbed: the query in latent space
    query = torch.cat([q_lat, q_pe[0].transpose(0, 1)], dim=-1)  # [T, H, rank + rope]
    o_lat = step.kernel(query, layer.k, v_pages, table, step.q_row, step.q_pos, step.kv_len,
                        scale=float(module.scaling), window=layer.window, sink_tokens=layer.sink_tokens,
                        chunk=layer.chunk, softcap=None, sinks=None)  # [T, H, rank]
    out = torch.einsum("thr,hvr->thv", o_lat, w_uv).reshape(1, t, heads * dv)
    return module.o_proj(out), None


def install(model: Any, layers: set[int]) -> None:
    """Route every MLA attention module of ``model`` whose layer is in ``layers`` through its
    latent pages."""
    left = set(layers)
    for module in model.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx not in left or not hasattr(module, "kv_a_proj_with_mqa"):
            continue
        missing = [a for a in _PARTS if not hasattr(module, a)]
        if missing or getattr(module.kv_b_proj, "bias", None) is not None:
            raise ConfigError(f"layer {layer_idx} ({type(module).__name__}): not a DeepSeek-style MLA module "
                              f"(missing {missing}, or kv_b_proj has a bias the absorption cannot carry)")
        module.hybridkv_rotary = _rotary(module)
        if getattr(module, "hybridkv_original_forward", None) is None:
            module.hybridkv_original_forward = module.forward  # a second engine on the same model wraps the original
        module.forward = functools.partial(mla_forward, module)
        left.discard(layer_idx)
    if left:
        raise ConfigError(f"MLA layers {sorted(left)} have latent pages but no MLA attention module in the model")
