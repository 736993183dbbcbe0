"""Models for the reference engine: seeded random weights from a transformers config, or the
weights of a local Hugging Face directory or GGUF file (``gguf_file.py``), and the hybridkv
layout of a loaded model, checked against the model's own ``layer_types``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from hybridkv.core.errors import ConfigError
from hybridkv.layouts.hf_config import parse_hf_config
from hybridkv.layouts.spec import ModelLayout
from hybridkv.runtime.gguf_file import is_gguf_path, load_gguf_model

if TYPE_CHECKING:
    import torch

# Small sizes that run in milliseconds on a CPU; any key may be overridden.
TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024}
_PATTERN = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
# What makes each family hybrid, at a size a test can decode past.
FAMILIES: dict[str, dict[str, Any]] = {
    "gemma3_text": {"sliding_window": 16, "layer_types": _PATTERN},
    "gemma2": {"sliding_window": 16, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gpt_oss": {"sliding_window": 16, "num_local_experts": 4, "num_experts_per_tok": 2},
    "cohere2": {"sliding_window": 16, "layer_types": _PATTERN},
    # sizes whose states a shared arena of 4-token pages cuts into 9 slices (buffers straddle them)
    "qwen3_next": {"layer_types": ["linear_attention"] * 3 + ["full_attention"], "linear_num_value_heads": 4,
                   "linear_num_key_heads": 1, "linear_key_head_dim": 8, "linear_value_head_dim": 16,
                   "linear_conv_kernel_dim": 4,
                   "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 32},
    # Qwen3.5: the same gated delta nets, dense MLPs (its MoE sibling as Qwen3-Next's)
    "qwen3_5_text": {"layer_types": ["linear_attention"] * 3 + ["full_attention"], "linear_num_value_heads": 4,
                     "linear_num_key_heads": 1, "linear_key_head_dim": 8, "linear_value_head_dim": 16,
                     "linear_conv_kernel_dim": 4},
    "qwen3_5_moe_text": {"layer_types": ["linear_attention"] * 3 + ["full_attention"], "linear_num_value_heads": 4,
                         "linear_num_key_heads": 1, "linear_key_head_dim": 8, "linear_value_head_dim": 16,
                         "linear_conv_kernel_dim": 4, "num_experts": 4, "num_experts_per_tok": 2,
                         "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32},
    # Mamba-2 layers and one attention layer; scan chunks of 8 split the prefill chunks' work
    "bamba": {"attn_layer_indices": [3], "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1,
              "mamba_d_state": 16, "mamba_expand": 1, "mamba_chunk_size": 8},
    # Mamba-2 layers and one attention layer, MoE MLPs
    "granitemoehybrid": {"layer_types": ["mamba", "mamba", "mamba", "attention"], "mamba_n_heads": 4,
                         "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_state": 16, "mamba_expand": 1,
                         "mamba_chunk_size": 8, "num_local_experts": 2, "num_experts_per_tok": 1,
                         "shared_intermediate_size": 64},
    # attention and a Mamba-2 mixer side by side in every layer: two caches per layer
    "falcon_h1": {"mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1,
                  "mamba_d_state": 16, "mamba_expand": 1, "mamba_chunk_size": 8},
    # Mamba-2, attention and cache-free MLP layers: model layer ids differ from the layout's
    "nemotron_h": {"layers_block_type": ["mamba", "mlp", "mamba", "attention", "mlp", "attention"],
                   "num_hidden_layers": 6, "mamba_num_heads": 4, "mamba_head_dim": 16, "n_groups": 1,
                   "ssm_state_size": 16, "expand": 1, "chunk_size": 8},
    # Mamba-2 layers and hybrid ones (the shared attention block over [hidden ; embeddings], then a
    # Mamba-2 mixer): two blocks, cycled over three hybrid layers; per-layer adapters (transformers'
    # k / v adapters need as many KV heads as heads) and RoPE
    "zamba2": {"layers_block_type": ["mamba", "hybrid", "mamba", "hybrid", "mamba", "hybrid"],
               "num_hidden_layers": 6, "num_key_value_heads": 4, "head_dim": 32, "n_mamba_heads": 4,
               "mamba_ngroups": 1, "mamba_d_state": 16, "mamba_expand": 1, "chunk_size": 8, "num_mem_blocks": 2,
               "use_shared_attention_adapter": True, "adapter_rank": 8, "use_mem_rope": True},
    # Mamba-1 layers and one attention layer (layer 3), MoE MLPs in every other layer
    "jamba": {"attn_layer_period": 4, "attn_layer_offset": 3, "num_experts": 2, "num_experts_per_tok": 1,
              "expert_layer_period": 2, "expert_layer_offset": 1, "mamba_d_state": 16, "mamba_expand": 1,
              "use_mamba_kernels": False},
    # gated short convolutions (conv_L_cache 3: 2 past inputs kept) and one attention layer
    "lfm2": {"full_attn_idxs": [3]},
    # the same with MoE MLPs after a dense first layer
    "lfm2_moe": {"layer_types": ["conv", "conv", "conv", "full_attention"], "num_experts": 2,
                 "num_experts_per_tok": 1, "moe_intermediate_size": 16, "num_dense_layers": 1},
    # lightning attention (a k^T v state per head) and full attention alternating, MoE MLPs;
    # blocks of 4 split a prefill chunk's own computation
    "minimax": {"layer_types": ["linear_attention", "full_attention"] * 2, "num_local_experts": 2,
                "num_experts_per_tok": 1, "block_size": 4},
    "llama4_text": {"attention_chunk_size": 16, "num_local_experts": 2, "intermediate_size_mlp": 128,
                    "interleave_moe_layer_step": 1, "attn_temperature_tuning": True, "floor_scale": 8},
    # MLA: one latent of 32 + a RoPE key of 8 per token; a dense layer, then MoE; yarn scaling
    # (its mscale enters the softmax scale) and DeepSeek's interleaved RoPE
    "deepseek_v3": {"num_hidden_layers": 3, "num_key_value_heads": 4, "head_dim": 8, "kv_lora_rank": 32,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "q_lora_rank": 24,
                    "first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2,
                    "moe_intermediate_size": 32, "n_group": 2, "topk_group": 1,
                    "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                        "original_max_position_embeddings": 256, "mscale": 1.0,
                                        "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}},
}


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """A transformers config of ``model_type`` at the ``TINY`` sizes (plus ``FAMILIES`` extras)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **{**TINY, **FAMILIES.get(model_type, {}), **overrides})
    except ValueError as e:
        raise ConfigError(f"model {model_type!r}: not a transformers model_type nor a directory ({e})") from None


def build_model(name_or_config: Any, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A causal LM in float32 on the CPU: a local HF directory or a ``.gguf`` file (its weights,
    dequantized), or seeded random weights from a transformers config, a dict with
    ``model_type``, or a ``model_type`` name (``tiny_config`` sizes; ``overrides`` change any
    field)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(name_or_config, str) and is_gguf_path(name_or_config):
        return load_gguf_model(name_or_config)
    if isinstance(name_or_config, str) and os.path.isdir(name_or_config):
        model = AutoModelForCausalLM.from_pretrained(name_or_config, dtype=torch.float32)
        return model.eval()
    if isinstance(name_or_config, PretrainedConfig):
        config = name_or_config
    elif isinstance(name_or_config, dict):
        fields = dict(name_or_config)
        if "model_type" not in fields:
            raise ConfigError("build_model: a config dict needs 'model_type' (e.g. 'gemma3_text')")
        config = AutoConfig.for_model(fields.pop("model_type"), **{**fields, **overrides})
    elif isinstance(name_or_config, str):
        config = tiny_config(name_or_config, **overrides)
    else:
        raise ConfigError(f"build_model: give a model_type, a directory, a .gguf file, a config dict or a "
                          f"PretrainedConfig, not {type(name_or_config).__name__}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def model_layout(model: Any) -> ModelLayout:
    """hybridkv's layout of ``model``'s text config in the model's dtype, checked layer by
    layer against the config's own ``layer_types``: a life cycle that disagrees is an error."""
    config = getattr(model.config, "text_config", None) or model.config
    fields = config.to_dict()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    fields["torch_dtype"] = fields["dtype"] = dtype
    layout = parse_hf_config(fields, config.model_type)
    types = fields.get("layer_types")
    if types is None:
        return layout
    if len(types) != len(layout.layers):
        raise ConfigError(f"{config.model_type}: {len(types)} layer_types but {len(layout.layers)} cache layers; "
                          "the engine runs attention-only models")
    for i, (kind, layer) in enumerate(zip(types, layout.layers, strict=True)):
        lc = layer.life_cycle
        window = fields.get("sliding_window")
        max_pos = fields.get("max_position_embeddings")
        if kind == "sliding_attention" and window is not None and max_pos is not None and window >= max_pos:
            kind = "full_attention"  # a window no position outgrows: hybridkv treats it as full
        want = {"sliding_attention": (window, None),
                "chunked_attention": (None, fields.get("attention_chunk_size"))}.get(kind, (None, None))
        if kind in _STATE_ONLY and not lc.per_token:
            continue  # a recurrent state (gated delta net, Mamba, short convolution)
        if (lc.window_tokens, lc.chunk_tokens) != want or kind not in _KNOWN_TYPES or not lc.per_token:
            raise ConfigError(f"{config.model_type} layer {i}: layer_types says {kind!r} (window, chunk = {want}) "
                              f"but the hybridkv layout has {lc.describe()}")
    return layout


_KNOWN_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
_CACHE_FREE = {"mlp", "moe"}  # Nemotron-H's layers with no attention and no state
_STATE_ONLY = {"linear_attention", "conv"}  # a recurrent state and no attention (LFM2: "conv")
_RECURRENT = _STATE_ONLY | {"hybrid"}  # a recurrent state (a hybrid layer: beside attention)


def _layer_types(model: Any) -> list[str]:
    config = getattr(model.config, "text_config", None) or model.config
    return list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)


def cache_layer_ids(model: Any) -> tuple[dict[int, int], dict[int, int]]:
    """Model layer index (``layer_idx``) -> hybridkv layout layer index, for attention caches
    and for recurrent states. The layout has one layer per cache in model order: a layer
    without a cache (Nemotron-H's MLP blocks) shifts the ones after it, and a ``hybrid`` layer
    (Falcon-H1: attention and a Mamba-2 mixer side by side) has two, attention first."""
    attention: dict[int, int] = {}
    state: dict[int, int] = {}
    for i, kind in enumerate(_layer_types(model)):
        if kind in _CACHE_FREE:
            continue
        if kind not in _STATE_ONLY:
            attention[i] = len(attention) + len(state)
        if kind in _RECURRENT:
            state[i] = len(attention) + len(state)
    return attention, state


def kv_heads(model: Any) -> dict[int, int]:
    """KV heads of every attention layer, by ``layer_idx`` (the model's layer index); an MLA
    layer caches one latent head."""
    config = getattr(model.config, "text_config", None) or model.config
    heads = 1 if mla_layers(model) else config.num_key_value_heads or config.num_attention_heads
    return {i: int(heads) for i, kind in enumerate(_layer_types(model))
            if kind not in _STATE_ONLY and kind not in _CACHE_FREE}


def recurrent_layers(model: Any) -> set[int]:
    """Layers that keep a recurrent state instead of keys and values (by ``layer_idx``)."""
    return {i for i, kind in enumerate(_layer_types(model)) if kind in _RECURRENT}


def mla_layers(model: Any) -> set[int]:
    """Layers of multi-head latent attention (DeepSeek-V3: every layer, from ``kv_lora_rank``)."""
    config = getattr(model.config, "text_config", None) or model.config
    if getattr(config, "kv_lora_rank", None) is None:
        return set()
    return set(range(config.num_hidden_layers))
