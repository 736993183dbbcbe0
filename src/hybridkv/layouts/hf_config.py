"""Layouts from a Hugging Face ``config.json`` (transformers 4 and 5).

Reads ``layer_types`` or ``layers_block_type`` when present; otherwise the model family's
pattern fields: ``hybrid_override_pattern`` (Nemotron-H), Falcon-H1 (attention and Mamba-2 in
every layer), ``attn_layer_indices`` (Bamba), ``attn_layer_period/offset`` (Jamba),
``full_attention_interval`` (Qwen3-Next), ``no_rope_layers`` with ``attention_chunk_size``
(Llama 4), ``sliding_window_pattern`` (Gemma 3, Cohere2), Gemma 2 alternation,
``use_sliding_window`` / ``max_window_layers`` (Qwen2), ``full_attn_idxs`` (LFM2). A recurrent
layer ("linear_attention", legacy "mamba"; "conv" for LFM2 only) holds the state its
``model_type`` defines (gated delta net, Mamba-2, Mamba-1, short convolution); any other is an
error naming the field. MLA from ``kv_lora_rank``. A window at least
``max_position_embeddings`` long never drops a token and is treated as full. Multimodal
configs are read from ``text_config``."""

from __future__ import annotations

from typing import Any, NamedTuple

from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_LAYERS, check_max
from hybridkv.layouts.hf_fields import ConfigFields
from hybridkv.layouts.hf_recurrent import RECURRENT, SHORT_CONV, recurrent_state
from hybridkv.layouts.spec import (
    LayerSpec,
    ModelLayout,
    attention_layer,
    dtype_bytes,
    mla_layer,
)
from hybridkv.lifecycles import Chunked, Full, Sliding

_FULL = "full_attention"
_SLIDING = "sliding_attention"
_CHUNKED = "chunked_attention"
# The model's recurrent layer. Transformers 5 calls every recurrent mixer "linear_attention"
# (legacy "mamba" and "conv" are renamed to it), so what it holds depends on model_type.
_RECURRENT = RECURRENT
# One model layer with attention *and* a recurrent state (Falcon-H1, Zamba2's shared block).
_HYBRID = "hybrid"
_NONE = "none"  # a layer without cache (Nemotron-H MoE/MLP layers)
_TYPE_ALIASES = {
    "full_attention": _FULL, "attention": _FULL, "global": _FULL,
    "sliding_attention": _SLIDING, "sliding": _SLIDING, "local": _SLIDING,
    "chunked_attention": _CHUNKED, "linear_attention": _RECURRENT, "mamba": _RECURRENT,
    "conv": _RECURRENT, "hybrid": _HYBRID, "moe": _NONE, "mlp": _NONE,
}
# Type names that mean a recurrent layer in some families only: LFM2's short convolution.
_FAMILY_ONLY = {"conv": SHORT_CONV}
_PATTERN_CHARS = {"M": _RECURRENT, "*": _FULL, "E": _NONE, "-": _NONE}  # Nemotron-H


def _str_list(cfg: ConfigFields, key: str, n: int) -> list[str]:
    """Field ``key``: a list of ``n`` strings (one per layer)."""
    value = cfg.get(key)
    if not isinstance(value, list) or len(value) != n:
        raise ConfigError(f"{cfg.path}: field {key!r} must list {n} entries (num_hidden_layers), got {value!r:.80}")
    bad = next((i for i, t in enumerate(value) if not isinstance(t, str)), None)
    if bad is not None:
        raise ConfigError(f"{cfg.path}: field {key!r} must list layer type names (strings); entry {bad} is "
                          f"{value[bad]!r:.60}")
    return value


class _Kinds(NamedTuple):
    """One cache kind per model layer, and the config field they were read from (named when a
    recurrent kind cannot be resolved for the config's model_type)."""

    field: str
    kinds: list[str]


def _model_type(cfg: ConfigFields) -> str:
    return cfg.model_type()


def _num_layers(cfg: ConfigFields) -> int:
    """``num_hidden_layers``; Nemotron-H saved by transformers 5 has none and counts its
    ``layers_block_type`` instead."""
    listed = cfg.get("layers_block_type")
    if cfg.get("num_hidden_layers") is None and isinstance(listed, list) and listed:
        check_max(f"{cfg.path}: field 'layers_block_type' entries", len(listed), MAX_LAYERS,
                  "no model has that many layers")
        return len(listed)
    return cfg.int("num_hidden_layers", maximum=MAX_LAYERS)


def _layer_types(cfg: ConfigFields, n: int) -> _Kinds:
    """The kind of every model layer, from the first field the config's family uses."""
    for read in (_listed_types, _family_types, _pattern_types):
        found = read(cfg, n)
        if found is not None:
            return found
    return _Kinds("sliding_window", _window_types(cfg, n))


def _named_types(cfg: ConfigFields, key: str, n: int) -> _Kinds:
    names = _str_list(cfg, key, n)
    unknown = sorted({t for t in names if t not in _TYPE_ALIASES})
    if unknown:
        raise ConfigError(f"{cfg.path}: field {key!r} has unknown type(s) {unknown}; "
                          f"known: {sorted(_TYPE_ALIASES)}")
    mt = _model_type(cfg)
    for name, families in _FAMILY_ONLY.items():
        if name in names and mt not in families:
            raise ConfigError(f"{cfg.path}: field {key!r} has type {name!r}, which hybridkv reads only for "
                              f"model_type {' or '.join(families)}, not {mt!r:.40}")
    return _Kinds(key, [_TYPE_ALIASES[t] for t in names])


def _listed_types(cfg: ConfigFields, n: int) -> _Kinds | None:
    """A type per layer: ``layer_types``, ``layers_block_type`` (Zamba2, Nemotron-H in
    transformers 5) or the ``hybrid_override_pattern`` string (Nemotron-H in transformers 4)."""
    for key in ("layer_types", "layers_block_type"):
        if cfg.get(key) is not None:
            return _named_types(cfg, key, n)
    pattern = cfg.get("hybrid_override_pattern")
    if pattern is None:
        return None
    if not isinstance(pattern, str) or any(c not in _PATTERN_CHARS for c in pattern):
        raise ConfigError(f"{cfg.path}: field 'hybrid_override_pattern' must be a string of "
                          f"{''.join(_PATTERN_CHARS)!r} such as 'M-M*', got {pattern!r:.60}")
    if len(pattern) != n:
        raise ConfigError(f"{cfg.path}: 'hybrid_override_pattern' has {len(pattern)} "
                          f"layers, num_hidden_layers is {n}")
    return _Kinds("hybrid_override_pattern", [_PATTERN_CHARS[c] for c in pattern])


def _attention_at(cfg: ConfigFields, key: str, n: int, default: list[int]) -> _Kinds:
    """Full attention at the layer indices listed in field ``key``, recurrent elsewhere."""
    value = cfg.get(key, default)
    if not isinstance(value, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n
                                          for i in value):
        raise ConfigError(f"{cfg.path}: field {key!r} must list layer indices in "
                          f"[0, {n}) (num_hidden_layers), got {value!r:.80}")
    return _Kinds(key, [_FULL if i in value else _RECURRENT for i in range(n)])


def _family_types(cfg: ConfigFields, n: int) -> _Kinds | None:
    """Families whose config lists no types: Falcon-H1 (attention and Mamba-2 in every layer),
    Bamba (attention at ``attn_layer_indices``, Mamba-2 elsewhere, none given: all Mamba-2),
    GraniteMoeHybrid without ``layer_types`` (all Mamba-2) and LFM2 (attention at
    ``full_attn_idxs``, short convs elsewhere, none given: all attention), as transformers
    builds them. LFM2-MoE builds nothing without ``layer_types``: an error naming it."""
    mt = _model_type(cfg)
    if mt == "falcon_h1":
        return _Kinds("model_type", [_HYBRID] * n)
    if cfg.get("attn_layer_indices") is not None or mt == "bamba":
        return _attention_at(cfg, "attn_layer_indices", n, [])
    if mt == "granitemoehybrid":
        return _Kinds("model_type", [_RECURRENT] * n)
    if mt == "lfm2":
        return _attention_at(cfg, "full_attn_idxs", n, list(range(n)))
    if mt == "lfm2_moe":
        raise ConfigError(f"{cfg.path}: missing field 'layer_types' (model_type 'lfm2_moe' lists which "
                          "layers are 'conv' and which 'full_attention')")
    return None


def _pattern_types(cfg: ConfigFields, n: int) -> _Kinds | None:
    """Periodic patterns: Jamba, Qwen3-Next, Llama 4."""
    if cfg.get("attn_layer_period") is not None:  # Jamba
        period, offset = cfg.int("attn_layer_period"), cfg.int("attn_layer_offset", 0, 0)
        if offset >= period:
            raise ConfigError(f"{cfg.path}: field 'attn_layer_offset' ({offset}) must be < "
                              f"'attn_layer_period' ({period})")
        return _Kinds("attn_layer_period", [_FULL if i % period == offset else _RECURRENT for i in range(n)])
    if cfg.get("full_attention_interval") is not None:  # Qwen3-Next
        k = cfg.int("full_attention_interval")
        return _Kinds("full_attention_interval", [_FULL if (i + 1) % k == 0 else _RECURRENT for i in range(n)])
    if cfg.get("attention_chunk_size") is not None:  # Llama 4: RoPE layers are chunked
        no_rope = cfg.get("no_rope_layers") or [int((i + 1) % 4 != 0) for i in range(n)]
        if not isinstance(no_rope, list) or len(no_rope) != n or any(f not in (0, 1) for f in no_rope):
            raise ConfigError(f"{cfg.path}: field 'no_rope_layers' must list {n} entries of 0 or 1 "
                              "(num_hidden_layers)")
        return _Kinds("no_rope_layers", [_CHUNKED if no_rope[i] else _FULL for i in range(n)])
    return None


def _window_types(cfg: ConfigFields, n: int) -> list[str]:
    """Attention-only models: full, or sliding by the family's window fields."""
    window = cfg.get("sliding_window")
    if window is None or cfg.get("use_sliding_window") is False:
        return [_FULL] * n
    if cfg.get("sliding_window_pattern") is not None:
        k = cfg.int("sliding_window_pattern")
        return [_FULL if (i + 1) % k == 0 else _SLIDING for i in range(n)]
    mt = _model_type(cfg)
    if mt == "gemma2":
        return [_SLIDING if i % 2 == 0 else _FULL for i in range(n)]
    if mt == "qwen2":
        first = cfg.int("max_window_layers", n, 0)
        return [_SLIDING if i >= first else _FULL for i in range(n)]
    return [_SLIDING] * n


# --- attention ---------------------------------------------------------------------------------

def _head_dim(cfg: ConfigFields, heads: int) -> int:
    if _model_type(cfg) == "zamba2":  # attention over [hidden, embedding]: 2 x hidden_size wide
        # transformers derives 2 x hidden_size / heads; a saved attention_head_dim or its alias
        # head_dim overrides it, the one saved last winning when both are
        saved = [f for f in cfg.data if f in ("attention_head_dim", "head_dim") and cfg.get(f) is not None]
        hd = cfg.int(saved[-1]) if saved else 2 * cfg.int("hidden_size") // heads
    else:
        hd = cfg.int("head_dim") if cfg.get("head_dim") is not None else cfg.int("hidden_size") // heads
    if hd < 1:
        raise ConfigError(f"{cfg.path}: field 'hidden_size' ({cfg.int('hidden_size')}) is smaller than "
                          f"'num_attention_heads' ({heads}): no head dimension; give 'head_dim'")
    return hd


def _attention_spec(cfg: ConfigFields, kind: str, elem: int, max_pos: int | None) -> LayerSpec:
    if cfg.get("kv_lora_rank") is not None:
        return mla_layer(cfg.int("kv_lora_rank"), cfg.int("qk_rope_head_dim"), elem)
    heads = cfg.int("num_attention_heads")
    hd, kv = _head_dim(cfg, heads), cfg.int("num_key_value_heads", heads)
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
    cfg = ConfigFields(data, path)
    n = _num_layers(cfg)
    dtype = cfg.get("torch_dtype", cfg.get("dtype"))
    notes = [] if dtype else ["no torch_dtype in config: bfloat16 assumed"]
    elem = dtype_bytes(dtype or "bfloat16", f"{path}: field 'torch_dtype'")
    max_pos = cfg.get("max_position_embeddings")
    if max_pos is not None:
        max_pos = cfg.int("max_position_embeddings")
    found = _layer_types(cfg, n)
    layers: list[LayerSpec] = []
    cache: dict[str, tuple[LayerSpec, ...]] = {}
    for kind in found.kinds:
        if kind not in cache:
            cache[kind] = _layer_specs(cfg, found.field, kind, elem, max_pos)
        layers.extend(cache[kind])
    if _HYBRID in cache:
        notes.append("each hybrid model layer holds attention and a recurrent state: two cache layers")
    names = [cfg.get("_name_or_path"), cfg.get("model_type"), path]
    name = next(v for v in names if (isinstance(v, str) and v and v.isprintable()) or v is path)
    try:
        return ModelLayout(name, tuple(layers), max_pos, f"hf-config:{path}", tuple(notes))
    except ConfigError as e:  # e.g. every layer cache-free: name the file
        raise ConfigError(f"{path}: {e}") from None


def _layer_specs(cfg: ConfigFields, field: str, kind: str, elem: int, max_pos: int | None) -> tuple[LayerSpec, ...]:
    """The cache layers of one model layer of ``kind``; a size the layout helpers reject is
    reported with the file.

    A hybrid model layer (Falcon-H1, Zamba2) becomes two cache layers, its attention then its
    recurrent state: a LayerSpec has one life cycle and either per-token or per-request buffers
    (spec.py), and layer ids already index cache layers, not model layers (Nemotron-H's MoE
    layers have none), so each part gets the pool and table its life cycle needs.
    """
    try:
        if kind == _NONE:
            return ()
        if kind == _RECURRENT:
            return (recurrent_state(cfg, field),)
        if kind == _HYBRID:
            return (_attention_spec(cfg, _FULL, elem, max_pos), recurrent_state(cfg, field))
        return (_attention_spec(cfg, kind, elem, max_pos),)
    except ConfigError as e:
        raise ConfigError(str(e) if str(e).startswith(cfg.path) else f"{cfg.path}: {e}") from None
