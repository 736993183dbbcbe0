"""Layouts from a Hugging Face ``config.json``.

Reads ``layer_types`` when present; otherwise the model family's pattern fields:
``sliding_window_pattern`` (Gemma 3, Cohere2), Gemma 2 alternation, ``no_rope_layers`` with
``attention_chunk_size`` (Llama 4), ``attn_layer_period/offset`` (Jamba),
``full_attention_interval`` (Qwen3-Next), ``hybrid_override_pattern`` (Nemotron-H),
``use_sliding_window`` / ``max_window_layers`` (Qwen2). MLA from ``kv_lora_rank``. A window
at least ``max_position_embeddings`` long never drops a token and is treated as full.
Multimodal configs are read from ``text_config``.
"""

from __future__ import annotations

from typing import Any

from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_LAYERS, MAX_TOKENS, check_max
from hybridkv.layouts.spec import (
    LayerSpec,
    ModelLayout,
    attention_layer,
    dtype_bytes,
    mla_layer,
    ssm_layer,
)
from hybridkv.lifecycles import Chunked, Full, Sliding

_FULL = "full_attention"
_SLIDING = "sliding_attention"
_CHUNKED = "chunked_attention"
_LINEAR = "linear_attention"
_MAMBA = "mamba"
_NONE = "none"  # a layer without cache (Nemotron-H MoE/MLP layers)
_TYPE_ALIASES = {
    "full_attention": _FULL, "attention": _FULL, "global": _FULL,
    "sliding_attention": _SLIDING, "sliding": _SLIDING, "local": _SLIDING,
    "chunked_attention": _CHUNKED, "linear_attention": _LINEAR, "mamba": _MAMBA,
}


class _Cfg:
    """Field access that names the file and field in every error."""

    def __init__(self, data: dict[str, Any], path: str) -> None:
        self.data, self.path = data, path

    def get(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def int(self, key: str, default: int | None = None, minimum: int = 1, maximum: int = MAX_TOKENS) -> int:
        """An integer field in [minimum, maximum]; every dimension and length of a config is
        far below MAX_TOKENS (2^40), and products of them are checked where they are made."""
        value = self.get(key, default)
        if value is None:
            raise ConfigError(f"{self.path}: missing field {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{self.path}: field {key!r} must be an integer >= {minimum}, "
                              f"got {value!r:.60}")
        check_max(f"{self.path}: field {key!r}", value, maximum, "no model needs that much")
        return value


def _str_list(cfg: _Cfg, key: str, n: int) -> list[str]:
    """Field ``key``: a list of ``n`` strings (one per layer)."""
    value = cfg.get(key)
    if not isinstance(value, list) or len(value) != n:
        raise ConfigError(f"{cfg.path}: field {key!r} must list {n} entries (num_hidden_layers), got {value!r:.80}")
    bad = next((i for i, t in enumerate(value) if not isinstance(t, str)), None)
    if bad is not None:
        raise ConfigError(f"{cfg.path}: field {key!r} must list layer type names (strings); entry {bad} is "
                          f"{value[bad]!r:.60}")
    return value


def _layer_types(cfg: _Cfg, n: int) -> list[str]:
    mt = cfg.get("model_type", "")
    if cfg.get("layer_types") is not None:
        explicit = _str_list(cfg, "layer_types", n)
        unknown = sorted({t for t in explicit if t not in _TYPE_ALIASES})
        if unknown:
            raise ConfigError(f"{cfg.path}: field 'layer_types' has unknown type(s) {unknown}; "
                              f"known: {sorted(_TYPE_ALIASES)}")
        return [_TYPE_ALIASES[t] for t in explicit]
    if cfg.get("hybrid_override_pattern") is not None:
        pattern = cfg.get("hybrid_override_pattern")
        if not isinstance(pattern, str):
            raise ConfigError(f"{cfg.path}: field 'hybrid_override_pattern' must be a string such as "
                              f"'M-M*', got {pattern!r:.60}")
        if len(pattern) != n:
            raise ConfigError(f"{cfg.path}: 'hybrid_override_pattern' has {len(pattern)} "
                              f"layers, num_hidden_layers is {n}")
        return [{"M": _MAMBA, "*": _FULL}.get(c, _NONE) for c in pattern]
    if cfg.get("attn_layer_period") is not None:  # Jamba
        period, offset = cfg.int("attn_layer_period"), cfg.int("attn_layer_offset", 0, 0)
        if offset >= period:
            raise ConfigError(f"{cfg.path}: field 'attn_layer_offset' ({offset}) must be < "
                              f"'attn_layer_period' ({period})")
        return [_FULL if i % period == offset else _MAMBA for i in range(n)]
    if cfg.get("full_attention_interval") is not None:  # Qwen3-Next
        k = cfg.int("full_attention_interval")
        return [_FULL if (i + 1) % k == 0 else _LINEAR for i in range(n)]
    if cfg.get("attention_chunk_size") is not None:  # Llama 4: RoPE layers are chunked
        no_rope = cfg.get("no_rope_layers") or [int((i + 1) % 4 != 0) for i in range(n)]
        if not isinstance(no_rope, list) or len(no_rope) != n or any(f not in (0, 1) for f in no_rope):
            raise ConfigError(f"{cfg.path}: field 'no_rope_layers' must list {n} entries of 0 or 1 "
                              "(num_hidden_layers)")
        return [_CHUNKED if no_rope[i] else _FULL for i in range(n)]
    window = cfg.get("sliding_window")
    if window is None or cfg.get("use_sliding_window") is False:
        return [_FULL] * n
    if cfg.get("sliding_window_pattern") is not None:
        k = cfg.int("sliding_window_pattern")
        return [_FULL if (i + 1) % k == 0 else _SLIDING for i in range(n)]
    if mt == "gemma2":
        return [_SLIDING if i % 2 == 0 else _FULL for i in range(n)]
    if mt == "qwen2":
        first = cfg.int("max_window_layers", n, 0)
        return [_SLIDING if i >= first else _FULL for i in range(n)]
    return [_SLIDING] * n


def _ssm_state(cfg: _Cfg, kind: str, hidden: int) -> LayerSpec:
    elem = dtype_bytes(cfg.get("torch_dtype", cfg.get("dtype", "bfloat16")), f"{cfg.path}: dtype")
    ssm_elem = elem
    if cfg.get("mamba_ssm_cache_dtype") not in (None, "auto"):
        ssm_elem = dtype_bytes(cfg.get("mamba_ssm_cache_dtype"), f"{cfg.path}: mamba_ssm_cache_dtype")
    if kind == _LINEAR:  # gated delta net
        nk, nv = cfg.int("linear_num_key_heads"), cfg.int("linear_num_value_heads")
        dk, dv = cfg.int("linear_key_head_dim"), cfg.int("linear_value_head_dim")
        conv = (2 * nk * dk + nv * dv) * (cfg.int("linear_conv_kernel_dim", 4) - 1)
        return ssm_layer(conv, nv * dk * dv, elem, ssm_elem)
    if cfg.get("mamba_num_heads") is not None:  # Mamba-2
        heads, hd = cfg.int("mamba_num_heads"), cfg.int("mamba_head_dim")
        d_state, groups = cfg.int("ssm_state_size"), cfg.int("n_groups", 1)
        conv_dim = heads * hd + 2 * groups * d_state
        kernel = cfg.int("conv_kernel", cfg.int("mamba_d_conv", 4))
        return ssm_layer(conv_dim * (kernel - 1), heads * hd * d_state, elem, ssm_elem)
    inner = cfg.int("mamba_expand", 2) * hidden  # Mamba-1
    return ssm_layer(inner * (cfg.int("mamba_d_conv", 4) - 1), inner * cfg.int("mamba_d_state", 16),
                     elem, ssm_elem)


def _attention_spec(cfg: _Cfg, kind: str, elem: int, max_pos: int | None) -> LayerSpec:
    if cfg.get("kv_lora_rank") is not None:
        return mla_layer(cfg.int("kv_lora_rank"), cfg.int("qk_rope_head_dim"), elem)
    heads = cfg.int("num_attention_heads")
    hd = cfg.int("head_dim") if cfg.get("head_dim") is not None else cfg.int("hidden_size") // heads
    if hd < 1:
        raise ConfigError(f"{cfg.path}: field 'hidden_size' ({cfg.int('hidden_size')}) is smaller than "
                          f"'num_attention_heads' ({heads}): no head dimension; give 'head_dim'")
    kv = cfg.int("num_key_value_heads", heads)
    if kind == _CHUNKED:
        return attention_layer(kv, hd, elem, Chunked(cfg.int("attention_chunk_size")))
    if kind == _SLIDING:
        window = cfg.int("sliding_window")
        if max_pos is None or window < max_pos:
            return attention_layer(kv, hd, elem, Sliding(window))
    return attention_layer(kv, hd, elem, Full())


def parse_hf_config(data: Any, path: str) -> ModelLayout:
    """Build a ModelLayout from a parsed Hugging Face config.json read from ``path``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config.json must hold one JSON object")
    if isinstance(data.get("text_config"), dict):
        outer_dtype = {k: v for k, v in data.items() if k in ("torch_dtype", "dtype")}
        data = {**outer_dtype, **data["text_config"]}
    cfg = _Cfg(data, path)
    n = cfg.int("num_hidden_layers", maximum=MAX_LAYERS)
    dtype = cfg.get("torch_dtype", cfg.get("dtype"))
    notes = [] if dtype else ["no torch_dtype in config: bfloat16 assumed"]
    elem = dtype_bytes(dtype or "bfloat16", f"{path}: field 'torch_dtype'")
    max_pos = cfg.get("max_position_embeddings")
    if max_pos is not None:
        max_pos = cfg.int("max_position_embeddings")
    layers: list[LayerSpec] = []
    cache: dict[str, LayerSpec] = {}
    for kind in _layer_types(cfg, n):
        if kind == _NONE:
            continue
        if kind not in cache:
            cache[kind] = _layer_spec(cfg, kind, elem, max_pos)
        layers.append(cache[kind])
    names = [cfg.get("_name_or_path"), cfg.get("model_type"), path]
    name = next(v for v in names if (isinstance(v, str) and v and v.isprintable()) or v is path)
    try:
        return ModelLayout(name, tuple(layers), max_pos, f"hf-config:{path}", tuple(notes))
    except ConfigError as e:  # e.g. every layer cache-free: name the file
        raise ConfigError(f"{path}: {e}") from None


def _layer_spec(cfg: _Cfg, kind: str, elem: int, max_pos: int | None) -> LayerSpec:
    """One layer of ``kind``; a size the layout helpers reject is reported with the file."""
    try:
        if kind in (_LINEAR, _MAMBA):
            return _ssm_state(cfg, kind, cfg.int("hidden_size"))
        return _attention_spec(cfg, kind, elem, max_pos)
    except ConfigError as e:
        raise ConfigError(str(e) if str(e).startswith(cfg.path) else f"{cfg.path}: {e}") from None
