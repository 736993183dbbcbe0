"""Hugging Face config.json files, read through models.load_model from files in tmp_path.

Each config holds only the fields the parser reads, with the values of the published model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import model_files
from hybridkv.core.errors import ConfigError
from hybridkv.layouts.catalog import catalog_layout
from hybridkv.layouts.hf_config import parse_hf_config
from hybridkv.layouts.models import load_model
from hybridkv.layouts.spec import BufferSpec, ModelLayout
from hybridkv.lifecycles import Chunked, Full, Sliding, Ssm
from model_files import assert_error_names_file_and_field, load

NEMOTRON_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"

GEMMA3_27B: dict[str, Any] = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "gemma3_text", "num_hidden_layers": 62, "hidden_size": 5376,
        "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
        "sliding_window": 1024, "sliding_window_pattern": 6, "max_position_embeddings": 131072,
    },
    "vision_config": {"model_type": "siglip_vision_model", "num_hidden_layers": 27},
}
GEMMA2_27B: dict[str, Any] = {
    "model_type": "gemma2", "torch_dtype": "bfloat16", "num_hidden_layers": 46, "hidden_size": 4608,
    "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128, "sliding_window": 4096,
    "max_position_embeddings": 8192,
}
GPT_OSS_20B: dict[str, Any] = {
    "model_type": "gpt_oss", "torch_dtype": "bfloat16", "num_hidden_layers": 24, "hidden_size": 2880,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "sliding_window": 128,
    "max_position_embeddings": 131072,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
}
LLAMA4_SCOUT: dict[str, Any] = {
    "model_type": "llama4", "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "llama4_text", "num_hidden_layers": 48, "hidden_size": 5120,
        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
        "attention_chunk_size": 8192, "no_rope_layers": [1, 1, 1, 0] * 12,
        "max_position_embeddings": 10485760,
    },
}
QWEN3_NEXT: dict[str, Any] = {
    "model_type": "qwen3_next", "torch_dtype": "bfloat16", "num_hidden_layers": 48, "hidden_size": 2048,
    "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
    "full_attention_interval": 4, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
    "max_position_embeddings": 262144,
}
JAMBA: dict[str, Any] = {
    "model_type": "jamba", "torch_dtype": "bfloat16", "num_hidden_layers": 32, "hidden_size": 4096,
    "num_attention_heads": 32, "num_key_value_heads": 8, "attn_layer_period": 8, "attn_layer_offset": 4,
    "mamba_expand": 2, "mamba_d_conv": 4, "mamba_d_state": 16, "max_position_embeddings": 262144,
}
DEEPSEEK_V3: dict[str, Any] = {
    "model_type": "deepseek_v3", "torch_dtype": "bfloat16", "num_hidden_layers": 61, "hidden_size": 7168,
    "num_attention_heads": 128, "num_key_value_heads": 128, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128, "v_head_dim": 128, "max_position_embeddings": 163840,
}
NEMOTRON_H: dict[str, Any] = {
    "model_type": "nemotron_h", "torch_dtype": "bfloat16", "num_hidden_layers": 52, "hidden_size": 2688,
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
    "hybrid_override_pattern": NEMOTRON_PATTERN, "mamba_num_heads": 64, "mamba_head_dim": 64,
    "ssm_state_size": 128, "n_groups": 8, "conv_kernel": 4, "mamba_ssm_cache_dtype": "float32",
    "max_position_embeddings": 262144,
}
QWEN2_5_7B: dict[str, Any] = {
    "model_type": "qwen2", "torch_dtype": "bfloat16", "num_hidden_layers": 28, "hidden_size": 3584,
    "num_attention_heads": 28, "num_key_value_heads": 4, "sliding_window": 131072,
    "max_window_layers": 28, "use_sliding_window": False, "max_position_embeddings": 131072,
}
PHI3_5_MINI: dict[str, Any] = {
    "model_type": "phi3", "torch_dtype": "bfloat16", "num_hidden_layers": 32, "hidden_size": 3072,
    "num_attention_heads": 32, "num_key_value_heads": 32, "sliding_window": 262144,
    "max_position_embeddings": 131072,
}


def write(tmp_path: Path, data: Any, name: str = "config.json") -> str:
    return model_files.write(tmp_path, data, name)


def ids(layout: ModelLayout, pred: Any) -> list[int]:
    return [i for i, layer in enumerate(layout.layers) if pred(layer.life_cycle)]


def test_gemma3_text_config_and_pattern(tmp_path: Path) -> None:
    layout = load(tmp_path, GEMMA3_27B)
    assert len(layout.layers) == 62
    assert layout.max_position_embeddings == 131072
    assert layout.name == "gemma3_text"
    full = ids(layout, lambda lc: isinstance(lc, Full))
    assert full == [i for i in range(62) if (i + 1) % 6 == 0]
    assert full == [5, 11, 17, 23, 29, 35, 41, 47, 53, 59]
    for i, layer in enumerate(layout.layers):
        assert layer.life_cycle == (Full() if i in full else Sliding(1024))
        assert layer.kv_bytes_per_token == 2 * 16 * 128 * 2  # K and V x kv_heads x head_dim x bf16
        assert layer.buffers == (BufferSpec("k", 16 * 128 * 2), BufferSpec("v", 16 * 128 * 2))
    assert layout.notes == ()  # top-level torch_dtype is read for the text model


def test_gemma2_alternates_from_sliding(tmp_path: Path) -> None:
    layout = load(tmp_path, GEMMA2_27B)
    assert len(layout.layers) == 46
    assert ids(layout, lambda lc: isinstance(lc, Full)) == list(range(1, 46, 2))
    assert ids(layout, lambda lc: lc == Sliding(4096)) == list(range(0, 46, 2))
    assert {layer.kv_bytes_per_token for layer in layout.layers} == {2 * 16 * 128 * 2}


def test_gpt_oss_explicit_layer_types(tmp_path: Path) -> None:
    layout = load(tmp_path, GPT_OSS_20B)
    assert [layer.life_cycle for layer in layout.layers] == [Sliding(128), Full()] * 12
    # head_dim 64 is explicit: hidden 2880 / 64 heads would be 45
    assert {layer.kv_bytes_per_token for layer in layout.layers} == {2 * 8 * 64 * 2}


def test_layer_type_aliases(tmp_path: Path) -> None:
    cfg = {**GPT_OSS_20B, "num_hidden_layers": 4, "layer_types": ["local", "global", "sliding", "attention"]}
    layout = load(tmp_path, cfg)
    assert [layer.life_cycle for layer in layout.layers] == [
        Sliding(128), Full(), Sliding(128), Full()]


def test_llama4_chunked_and_nope_global(tmp_path: Path) -> None:
    layout = load(tmp_path, LLAMA4_SCOUT)
    assert len(layout.layers) == 48
    assert layout.max_position_embeddings == 10485760
    assert ids(layout, lambda lc: isinstance(lc, Full)) == list(range(3, 48, 4))
    assert ids(layout, lambda lc: lc == Chunked(8192)) == [i for i in range(48) if i % 4 != 3]
    assert {layer.kv_bytes_per_token for layer in layout.layers} == {4096}


def test_llama4_empty_no_rope_layers_uses_the_default_interval(tmp_path: Path) -> None:
    cfg = {**LLAMA4_SCOUT, "text_config": {**LLAMA4_SCOUT["text_config"], "no_rope_layers": []}}
    assert load(tmp_path, cfg).layers == load(tmp_path, LLAMA4_SCOUT).layers


def test_qwen3_next_gated_deltanet_state(tmp_path: Path) -> None:
    layout = load(tmp_path, QWEN3_NEXT)
    assert len(layout.layers) == 48
    assert ids(layout, lambda lc: isinstance(lc, Full)) == list(range(3, 48, 4))
    ssm = [layer for layer in layout.layers if isinstance(layer.life_cycle, Ssm)]
    assert len(ssm) == 36
    conv = (2 * 16 * 128 + 32 * 128) * (4 - 1)  # 24,576 elements
    temporal = 32 * 128 * 128  # 524,288 elements
    assert ssm[0].buffers == (BufferSpec("conv", state_bytes=conv * 2),
                              BufferSpec("ssm", state_bytes=temporal * 2))
    assert ssm[0].state_bytes == (conv + temporal) * 2 == 1_097_728
    assert layout.layers[3].kv_bytes_per_token == 2 * 2 * 256 * 2


def test_jamba_mamba1_state(tmp_path: Path) -> None:
    layout = load(tmp_path, JAMBA)
    assert len(layout.layers) == 32
    assert ids(layout, lambda lc: isinstance(lc, Full)) == [4, 12, 20, 28]
    mamba = layout.layers[0]
    inner = 2 * 4096
    assert mamba.life_cycle == Ssm()
    assert mamba.state_bytes == (inner * (4 - 1) + inner * 16) * 2 == 311_296
    assert layout.layers[4].kv_bytes_per_token == 2 * 8 * 128 * 2  # head_dim = 4096 / 32


def test_deepseek_v3_mla(tmp_path: Path) -> None:
    layout = load(tmp_path, DEEPSEEK_V3)
    assert len(layout.layers) == 61
    layer = layout.layers[0]
    assert layer.life_cycle == Full()
    assert layer.buffers == (BufferSpec("latent", 1024 + 128),)  # [c_kv (512) ; k_pe (64)] x 2 B
    assert layer.kv_bytes_per_token == (512 + 64) * 2 == 1152  # not 128 heads x (192 + 128)
    assert layout.kv_bytes_per_token() == 61 * 1152


def test_nemotron_h_pattern_keeps_only_cache_layers(tmp_path: Path) -> None:
    layout = load(tmp_path, NEMOTRON_H)
    kept = [c for c in NEMOTRON_PATTERN if c in "M*"]
    assert len(NEMOTRON_PATTERN) == 52
    assert len(layout.layers) == len(kept) == 29
    assert ["M" if isinstance(layer.life_cycle, Ssm) else "*" for layer in layout.layers] == kept
    mamba = layout.layers[0]
    conv_dim = 64 * 64 + 2 * 8 * 128  # 6144
    conv, ssm = conv_dim * (4 - 1), 64 * 64 * 128
    assert mamba.buffers == (BufferSpec("conv", state_bytes=conv * 2), BufferSpec("ssm", state_bytes=ssm * 4))
    assert mamba.state_bytes == 18432 * 2 + 524288 * 4 == 2_134_016
    attn = [layer for layer in layout.layers if not isinstance(layer.life_cycle, Ssm)]
    assert len(attn) == 6
    assert attn[0].kv_bytes_per_token == 2 * 2 * 128 * 2


def test_nemotron_h_auto_ssm_dtype_is_model_dtype(tmp_path: Path) -> None:
    layout = load(tmp_path, {**NEMOTRON_H, "mamba_ssm_cache_dtype": "auto"})
    assert layout.layers[0].state_bytes == (18432 + 524288) * 2 == 1_085_440


def test_qwen2_use_sliding_window_false_is_all_full(tmp_path: Path) -> None:
    layout = load(tmp_path, QWEN2_5_7B)
    assert len(layout.layers) == 28
    assert all(layer.life_cycle == Full() for layer in layout.layers)
    assert layout.layers[0].kv_bytes_per_token == 2 * 4 * 128 * 2  # head_dim = 3584 / 28


def test_qwen2_max_window_layers(tmp_path: Path) -> None:
    cfg = {**QWEN2_5_7B, "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 20}
    layout = load(tmp_path, cfg)
    assert ids(layout, lambda lc: isinstance(lc, Full)) == list(range(20))
    assert ids(layout, lambda lc: lc == Sliding(4096)) == list(range(20, 28))


def test_phi3_window_beyond_max_positions_is_full(tmp_path: Path) -> None:
    layout = load(tmp_path, PHI3_5_MINI)
    assert len(layout.layers) == 32
    assert all(layer.life_cycle == Full() for layer in layout.layers)
    assert layout.layers[0].kv_bytes_per_token == 2 * 32 * 96 * 2 == 12288


def test_phi3_short_window_is_sliding(tmp_path: Path) -> None:
    layout = load(tmp_path, {**PHI3_5_MINI, "sliding_window": 2047, "max_position_embeddings": 4096})
    assert all(layer.life_cycle == Sliding(2047) for layer in layout.layers)


def test_no_sliding_window_is_all_full(tmp_path: Path) -> None:
    cfg = {"model_type": "llama", "torch_dtype": "bfloat16", "num_hidden_layers": 32, "hidden_size": 4096,
           "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072}
    layout = load(tmp_path, cfg)
    assert layout.layers == catalog_layout("llama-3.1-8b").layers


def test_missing_dtype_assumes_bf16_with_a_note(tmp_path: Path) -> None:
    cfg = {k: v for k, v in QWEN2_5_7B.items() if k != "torch_dtype"}
    layout = load(tmp_path, cfg)
    assert layout.layers[0].kv_bytes_per_token == 2048
    assert layout.notes == ("no torch_dtype in config: bfloat16 assumed",)


def test_float32_dtype(tmp_path: Path) -> None:
    layout = load(tmp_path, {**QWEN2_5_7B, "torch_dtype": "float32"})
    assert layout.layers[0].kv_bytes_per_token == 2 * 4 * 128 * 4


def test_top_level_dtype_key_applies_to_text_config(tmp_path: Path) -> None:
    cfg = {k: v for k, v in GEMMA3_27B.items() if k != "torch_dtype"}
    layout = load(tmp_path, {**cfg, "dtype": "float32"})
    assert layout.layers[0].kv_bytes_per_token == 2 * 16 * 128 * 4


# --- the same models in the catalog --------------------------------------------------------

SAME_AS_CATALOG = [
    ("gemma-3-27b", GEMMA3_27B), ("gemma-2-27b", GEMMA2_27B), ("gpt-oss-20b", GPT_OSS_20B),
    ("llama-4-scout", LLAMA4_SCOUT), ("qwen3-next-80b-a3b", QWEN3_NEXT), ("jamba-1.5-mini", JAMBA),
    ("deepseek-v3", DEEPSEEK_V3), ("nemotron-3-nano-30b-a3b", NEMOTRON_H), ("qwen2.5-7b", QWEN2_5_7B),
    ("phi-3.5-mini", PHI3_5_MINI),
]


@pytest.mark.parametrize(("name", "cfg"), SAME_AS_CATALOG, ids=[n for n, _ in SAME_AS_CATALOG])
def test_matches_catalog_layout(tmp_path: Path, name: str, cfg: dict[str, Any]) -> None:
    ours, cat = load(tmp_path, cfg), catalog_layout(name)
    assert len(ours.layers) == len(cat.layers)
    assert [layer.life_cycle for layer in ours.layers] == [layer.life_cycle for layer in cat.layers]
    assert [la.kv_bytes_per_token for la in ours.layers] == [la.kv_bytes_per_token for la in cat.layers]
    assert [layer.state_bytes for layer in ours.layers] == [layer.state_bytes for layer in cat.layers]
    assert ours.layers == cat.layers  # buffers too
    assert ours.max_position_embeddings == cat.max_position_embeddings


# --- errors: ConfigError naming the file and the field ------------------------------------

def _drop(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k != key}


ERRORS: list[tuple[str, Any, str]] = [
    ("layer_types too short", {**GPT_OSS_20B, "layer_types": ["full_attention"] * 23}, "layer_types"),
    ("layer_types too long", {**GPT_OSS_20B, "layer_types": ["full_attention"] * 25}, "layer_types"),
    ("layer_types not a list", {**GPT_OSS_20B, "layer_types": "full_attention"}, "layer_types"),
    ("unknown layer type", {**GPT_OSS_20B, "layer_types": ["full_attention"] * 23 + ["cross_attention"]},
     "layer_types"),
    ("missing num_hidden_layers in text_config",
     {**GEMMA3_27B, "text_config": _drop(GEMMA3_27B["text_config"], "num_hidden_layers")},
     "num_hidden_layers"),
    ("num_hidden_layers 0", {**QWEN2_5_7B, "num_hidden_layers": 0}, "num_hidden_layers"),
    ("unknown torch_dtype", {**QWEN2_5_7B, "torch_dtype": "float7"}, "torch_dtype"),
    ("unknown torch_dtype, text_config", {**GEMMA3_27B, "torch_dtype": "bfloat17"}, "torch_dtype"),
    ("unknown mamba_ssm_cache_dtype", {**NEMOTRON_H, "mamba_ssm_cache_dtype": "float9"},
     "mamba_ssm_cache_dtype"),
    ("pattern length", {**NEMOTRON_H, "num_hidden_layers": 51}, "hybrid_override_pattern"),
    ("missing num_attention_heads", _drop(QWEN2_5_7B, "num_attention_heads"), "num_attention_heads"),
    ("missing linear_num_value_heads", _drop(QWEN3_NEXT, "linear_num_value_heads"), "linear_num_value_heads"),
    ("missing qk_rope_head_dim", _drop(DEEPSEEK_V3, "qk_rope_head_dim"), "qk_rope_head_dim"),
    ("sliding_window not an int", {**PHI3_5_MINI, "sliding_window": "4096"}, "sliding_window"),
    ("attn_layer_period 0", {**JAMBA, "attn_layer_period": 0}, "attn_layer_period"),
]


@pytest.mark.parametrize(("data", "field"), [(d, f) for _, d, f in ERRORS], ids=[i for i, _, _ in ERRORS])
def test_errors_name_file_and_field(tmp_path: Path, data: Any, field: str) -> None:
    assert_error_names_file_and_field(tmp_path, data, field)


def test_missing_num_hidden_layers_top_level(tmp_path: Path) -> None:
    path = write(tmp_path, _drop(QWEN2_5_7B, "num_hidden_layers"))
    with pytest.raises(ConfigError, match="num_hidden_layers") as info:
        load_model(path)
    assert path in str(info.value)


def test_llama4_short_no_rope_layers(tmp_path: Path) -> None:
    cfg = {**LLAMA4_SCOUT, "text_config": {**LLAMA4_SCOUT["text_config"], "no_rope_layers": [1, 1, 1, 0]}}
    path = write(tmp_path, cfg)
    with pytest.raises(ConfigError, match="no_rope_layers") as info:
        load_model(path)
    assert path in str(info.value)


def test_non_string_torch_dtype(tmp_path: Path) -> None:
    path = write(tmp_path, {**QWEN2_5_7B, "torch_dtype": 16})
    with pytest.raises(ConfigError, match="torch_dtype") as info:
        load_model(path)
    assert path in str(info.value)


# --- transformers-5 hybrid families: layer kinds and exact bytes -----------------------------
# Dimensions shaped like the published checkpoints (Bamba-9B, Falcon-H1, Zamba2, Nemotron-H,
# Granite-4.0-H), in bfloat16; the byte counts are worked out by hand beside each test.

BAMBA: dict[str, Any] = {
    "model_type": "bamba", "dtype": "bfloat16", "num_hidden_layers": 32, "hidden_size": 4096,
    "num_attention_heads": 32, "num_key_value_heads": 8, "attn_layer_indices": [9, 18, 27],
    "mamba_n_heads": 128, "mamba_d_head": 64, "mamba_n_groups": 1, "mamba_d_state": 128,
    "mamba_d_conv": 4, "mamba_expand": 2, "max_position_embeddings": 262144,
}
FALCON_H1: dict[str, Any] = {
    "model_type": "falcon_h1", "torch_dtype": "bfloat16", "num_hidden_layers": 36, "hidden_size": 1024,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "mamba_d_ssm": 1536,
    "mamba_n_heads": 24, "mamba_d_head": 64, "mamba_n_groups": 1, "mamba_d_state": 128,
    "mamba_d_conv": 4, "mamba_expand": 2, "max_position_embeddings": 16384,
}
ZAMBA2: dict[str, Any] = {
    "model_type": "zamba2", "torch_dtype": "bfloat16", "num_hidden_layers": 12, "hidden_size": 2048,
    "num_attention_heads": 32, "num_key_value_heads": 32, "layers_block_type": (["mamba"] * 5 + ["hybrid"]) * 2,
    "n_mamba_heads": 64, "mamba_ngroups": 1, "mamba_d_state": 64, "mamba_d_conv": 4, "mamba_expand": 2,
    "attention_head_dim": 128, "mamba_headdim": 64,  # (2 x 2048 / 32: the derived value, saved)
    "max_position_embeddings": 4096,
}
NEMOTRON_H_TF5: dict[str, Any] = {  # transformers 5 saves layers_block_type and no num_hidden_layers
    **{k: v for k, v in NEMOTRON_H.items() if k not in ("num_hidden_layers", "hybrid_override_pattern")},
    "layers_block_type": [{"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}[c]
                          for c in NEMOTRON_PATTERN],
}
GRANITE_4_H: dict[str, Any] = {
    "model_type": "granitemoehybrid", "torch_dtype": "bfloat16", "num_hidden_layers": 10, "hidden_size": 1536,
    "num_attention_heads": 12, "num_key_value_heads": 4, "layer_types": (["mamba"] * 4 + ["attention"]) * 2,
    "mamba_n_heads": 48, "mamba_d_head": 64, "mamba_n_groups": 1, "mamba_d_state": 128, "mamba_d_conv": 4,
    "mamba_expand": 2, "max_position_embeddings": 131072,
}
LFM2_ATTENTION = [2, 5, 8, 10, 12, 14]
LFM2: dict[str, Any] = {  # LFM2-1.2B's sizes: gated short convs, attention at full_attn_idxs
    "model_type": "lfm2", "torch_dtype": "bfloat16", "num_hidden_layers": 16, "hidden_size": 2048,
    "num_attention_heads": 32, "num_key_value_heads": 8, "conv_L_cache": 3, "full_attn_idxs": LFM2_ATTENTION,
    "layer_types": ["full_attention" if i in LFM2_ATTENTION else "conv" for i in range(16)],
    "max_position_embeddings": 128000,
}


def kinds(layout: ModelLayout) -> list[str]:
    return ["ssm" if isinstance(la.life_cycle, Ssm) else la.life_cycle.describe() for la in layout.layers]


def ssm_buffers(conv_elems: int, ssm_elems: int, conv_b: int = 2, ssm_b: int = 2) -> tuple[BufferSpec, ...]:
    return (BufferSpec("conv", state_bytes=conv_elems * conv_b), BufferSpec("ssm", state_bytes=ssm_elems * ssm_b))


def test_bamba_attn_layer_indices(tmp_path: Path) -> None:
    layout = load(tmp_path, BAMBA)
    assert ids(layout, lambda lc: isinstance(lc, Full)) == [9, 18, 27]
    assert len(ids(layout, lambda lc: isinstance(lc, Ssm))) == 29
    conv, ssm = (128 * 64 + 2 * 1 * 128) * (4 - 1), 128 * 64 * 128  # 25,344 and 1,048,576 elements
    assert layout.layers[0].buffers == ssm_buffers(conv, ssm)
    assert layout.layers[0].state_bytes == 2_147_840
    assert layout.layers[9].kv_bytes_per_token == 2 * 8 * 128 * 2 == 4096
    assert layout.kv_bytes_per_token() == 3 * 4096


def test_bamba_auto_head_dim_and_no_attention(tmp_path: Path) -> None:
    cfg = {**_drop(BAMBA, "attn_layer_indices"), "mamba_d_head": "auto"}  # 2 x 4096 / 128 = 64
    layout = load(tmp_path, cfg)
    assert kinds(layout) == ["ssm"] * 32
    assert layout.layers[0].state_bytes == 2_147_840


def test_falcon_h1_keeps_attention_and_mamba2_in_every_layer(tmp_path: Path) -> None:
    layout = load(tmp_path, FALCON_H1)
    assert kinds(layout) == ["full", "ssm"] * 36  # one attention and one state per model layer
    conv, ssm = (1536 + 2 * 1 * 128) * (4 - 1), 24 * 64 * 128  # 5,376 and 196,608 elements
    assert layout.layers[1].buffers == ssm_buffers(conv, ssm)
    assert layout.layers[1].state_bytes == 403_968
    assert layout.layers[0].kv_bytes_per_token == 2 * 2 * 64 * 2 == 512
    assert layout.kv_bytes_per_token() == 36 * 512
    assert "two cache layers" in layout.notes[-1]


def test_falcon_h1_inner_size_from_expand_when_d_ssm_is_null(tmp_path: Path) -> None:
    layout = load(tmp_path, {**FALCON_H1, "mamba_d_ssm": None, "mamba_n_heads": 32})  # 2 x 1024 = 32 x 64
    assert layout.layers[1].buffers == ssm_buffers((2048 + 256) * 3, 32 * 64 * 128)


def test_zamba2_hybrid_layers_keep_their_mamba2_state(tmp_path: Path) -> None:
    layout = load(tmp_path, ZAMBA2)
    model = (["ssm"] * 5 + ["full", "ssm"]) * 2  # a hybrid layer: shared attention, then Mamba-2
    assert kinds(layout) == model
    conv, ssm = (4096 + 2 * 1 * 64) * (4 - 1), 64 * 64 * 64  # 12,672 and 262,144 elements
    assert {la.buffers for la in layout.layers if isinstance(la.life_cycle, Ssm)} == {ssm_buffers(conv, ssm)}
    assert layout.layers[0].state_bytes == 549_632
    assert layout.layers[5].kv_bytes_per_token == 2 * 32 * 128 * 2  # head_dim 2 x 2048 / 32
    tf5 = {**ZAMBA2, "layers_block_type": (["linear_attention"] * 5 + ["hybrid"]) * 2}
    assert load(tmp_path, tf5).layers == layout.layers


@pytest.mark.parametrize(("saved", "head_dim"), [
    ({}, 128), ({"attention_head_dim": 96}, 96), ({"head_dim": 80}, 80),
    ({"attention_head_dim": 96, "head_dim": 80}, 80), ({"head_dim": 80, "attention_head_dim": 96}, 96)])
def test_zamba2_saved_head_dim_wins_as_in_transformers(tmp_path: Path, saved: dict[str, int], head_dim: int) -> None:
    """transformers derives 2 x hidden_size / heads, then a saved attention_head_dim or its
    alias head_dim overrides it (the one saved last, when both are): checked against it."""
    data = {k: v for k, v in ZAMBA2.items() if k != "attention_head_dim"} | saved
    assert load(tmp_path, data).layers[5].kv_bytes_per_token == 2 * 32 * head_dim * 2
    tf = pytest.importorskip("transformers")
    assert tf.Zamba2Config.from_dict(data).attention_head_dim == head_dim


def test_nemotron_h_transformers5_layers_block_type(tmp_path: Path) -> None:
    layout = load(tmp_path, NEMOTRON_H_TF5)  # a config.json with layers_block_type only
    assert layout.layers == parse_hf_config(NEMOTRON_H, "config.json").layers
    assert layout.layers == catalog_layout("nemotron-3-nano-30b-a3b").layers
    assert len(layout.layers) == 29
    assert layout.layers[0].state_bytes == 2_134_016


def test_granite_4_h_mamba_layers_are_mamba2(tmp_path: Path) -> None:
    layout = load(tmp_path, GRANITE_4_H)
    assert kinds(layout) == (["ssm"] * 4 + ["full"]) * 2
    conv, ssm = (48 * 64 + 2 * 1 * 128) * (4 - 1), 48 * 64 * 128  # 9,984 and 393,216 elements
    assert layout.layers[0].buffers == ssm_buffers(conv, ssm)
    assert layout.layers[0].state_bytes == 806_400
    assert layout.layers[4].kv_bytes_per_token == 2 * 4 * 128 * 2  # head_dim 1536 / 12
    tf5 = {**GRANITE_4_H, "layer_types": (["linear_attention"] * 4 + ["full_attention"]) * 2}
    assert load(tmp_path, tf5).layers == layout.layers
    assert kinds(load(tmp_path, _drop(GRANITE_4_H, "layer_types"))) == ["ssm"] * 10


def test_linear_attention_is_gated_delta_net_for_qwen3_5(tmp_path: Path) -> None:
    qwen35 = {**_drop(QWEN3_NEXT, "full_attention_interval"), "model_type": "qwen3_5_text",
              "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 12}
    assert load(tmp_path, qwen35).layers == load(tmp_path, QWEN3_NEXT).layers


def test_lfm2_conv_layers_keep_one_short_conv_state(tmp_path: Path) -> None:
    """A conv layer keeps hidden_size x (conv_L_cache - 1) past inputs and nothing else."""
    layout = load(tmp_path, LFM2)
    assert ids(layout, lambda lc: isinstance(lc, Full)) == LFM2_ATTENTION
    conv = [la for la in layout.layers if isinstance(la.life_cycle, Ssm)]
    assert len(conv) == 10
    assert {la.buffers for la in conv} == {(BufferSpec("conv", state_bytes=2048 * (3 - 1) * 2),)}  # 8,192 B
    assert conv[0].state_bytes == 8192
    assert layout.kv_bytes_per_token() == 6 * 2 * 8 * 64 * 2 == 12_288  # head_dim 2048 / 32 = 64


def test_lfm2_without_layer_types_reads_full_attn_idxs(tmp_path: Path) -> None:
    assert load(tmp_path, _drop(LFM2, "layer_types")).layers == load(tmp_path, LFM2).layers
    no_lists = _drop(_drop(LFM2, "layer_types"), "full_attn_idxs")  # transformers: attention everywhere
    assert kinds(load(tmp_path, no_lists)) == ["full"] * 16


def test_lfm2_moe_conv_layers_match_lfm2(tmp_path: Path) -> None:
    moe = {**_drop(LFM2, "full_attn_idxs"), "model_type": "lfm2_moe", "conv_L_cache": 4}
    conv = [la for la in load(tmp_path, moe).layers if isinstance(la.life_cycle, Ssm)]
    assert {la.buffers for la in conv} == {(BufferSpec("conv", state_bytes=2048 * (4 - 1) * 2),)}  # 12,288 B
    assert load(tmp_path, {**moe, "model_type": "lfm2"}).layers == load(tmp_path, moe).layers


HYBRID_ERRORS: list[tuple[str, Any, list[str]]] = [
    ("kimi KDA", {**GPT_OSS_20B, "model_type": "kimi_linear", "layer_types": ["linear_attention"] * 24},
     ["layer_types", "'linear_attention'", "KDA"]),
    ("unknown model_type", {**QWEN3_NEXT, "model_type": "my_hybrid"},
     ["full_attention_interval", "'linear_attention'", "'my_hybrid'"]),
    ("mamba in another family", {**GPT_OSS_20B, "layer_types": ["mamba"] * 24}, ["layer_types", "'gpt_oss'"]),
    ("hybrid_sliding", {**FALCON_H1, "layer_types": ["hybrid_sliding"] * 36}, ["layer_types", "hybrid_sliding"]),
    ("attn index past the layers", {**BAMBA, "attn_layer_indices": [9, 32]}, ["attn_layer_indices", "[0, 32)"]),
    ("attn index not an int", {**BAMBA, "attn_layer_indices": ["9"]}, ["attn_layer_indices"]),
    ("bamba head split", {**BAMBA, "mamba_d_head": 32}, ["mamba_d_head", "8192"]),
    ("falcon head split", {**FALCON_H1, "mamba_d_ssm": 1000}, ["mamba_d_head", "mamba_d_ssm"]),
    ("zamba2 heads", {**ZAMBA2, "n_mamba_heads": 48}, ["n_mamba_heads", "4096"]),
    ("zamba2 missing layers", {**ZAMBA2, "num_hidden_layers": 13}, ["layers_block_type", "13"]),
    ("nemotron list vs count", {**NEMOTRON_H_TF5, "num_hidden_layers": 50}, ["layers_block_type", "50"]),
    ("nemotron pattern char", {**NEMOTRON_H, "hybrid_override_pattern": "X" * 52}, ["hybrid_override_pattern"]),
    ("granite missing d_state", _drop(GRANITE_4_H, "mamba_d_state"), ["mamba_d_state"]),
    ("falcon missing heads", _drop(FALCON_H1, "mamba_n_heads"), ["mamba_n_heads"]),
    ("conv in another family", {**GPT_OSS_20B, "layer_types": ["conv"] * 24},
     ["layer_types", "'conv'", "lfm2", "'gpt_oss'"]),
    ("conv in a Mamba-2 family", {**GRANITE_4_H, "layer_types": (["conv"] * 4 + ["attention"]) * 2},
     ["layer_types", "'conv'", "'granitemoehybrid'"]),
    ("lfm2 width-1 conv", {**LFM2, "conv_L_cache": 1}, ["conv_L_cache", ">= 2"]),
    ("lfm2 missing hidden_size", _drop(LFM2, "hidden_size"), ["hidden_size"]),
    ("lfm2 attention index past the layers", {**_drop(LFM2, "layer_types"), "full_attn_idxs": [16]},
     ["full_attn_idxs", "[0, 16)"]),
    ("lfm2_moe without layer_types", {**_drop(LFM2, "layer_types"), "model_type": "lfm2_moe"},
     ["layer_types", "lfm2_moe"]),
]


@pytest.mark.parametrize(("data", "needles"), [(d, n) for _, d, n in HYBRID_ERRORS],
                         ids=[i for i, _, _ in HYBRID_ERRORS])
def test_hybrid_errors_name_the_field_and_value(tmp_path: Path, data: Any, needles: list[str]) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_model(path)
    assert path in str(info.value)
    for needle in needles:
        assert needle in str(info.value)


# --- oracle: transformers allocates its own cache (skipped where transformers is absent) ------

def _tiny_transformers_configs(tf: Any) -> dict[str, Any]:
    """One tiny float32 config per hybrid family, small enough to run a forward on CPU."""
    common = {"vocab_size": 64, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "dtype": "float32"}
    return {
        "bamba": tf.BambaConfig(**common, num_hidden_layers=4, intermediate_size=64, attn_layer_indices=[1, 3],
                                mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=8),
        "falcon_h1": tf.FalconH1Config(**common, num_hidden_layers=3, head_dim=24, intermediate_size=64,
                                       mamba_d_ssm=96, mamba_n_heads=6, mamba_d_state=16, mamba_d_conv=3,
                                       mamba_chunk_size=8),
        "zamba2": tf.Zamba2Config(**common, num_hidden_layers=4, layers_block_type=["mamba", "hybrid"] * 2,
                                  n_mamba_heads=4, mamba_d_state=16, chunk_size=8, use_mamba_kernels=False),
        "nemotron_h": tf.NemotronHConfig(
            **common, head_dim=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=16,
            layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "linear_attention"],
            intermediate_size=32, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
            n_routed_experts=2, num_experts_per_tok=1, chunk_size=8, use_mamba_kernels=False),
        "granitemoehybrid": tf.GraniteMoeHybridConfig(
            **common, num_hidden_layers=3, intermediate_size=32, shared_intermediate_size=32, num_local_experts=2,
            num_experts_per_tok=1, layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8,
            mamba_d_state=16, mamba_chunk_size=8),
        "lfm2": tf.Lfm2Config(**common, num_hidden_layers=4, intermediate_size=64, full_attn_idxs=[1, 3],
                              conv_L_cache=4),
        "lfm2_moe": tf.Lfm2MoeConfig(**common, num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=16,
                                     num_experts=2, num_experts_per_tok=1, num_dense_layers=1,
                                     layer_types=["conv", "full_attention", "conv", "conv"]),
    }


def _transformers_cache_sizes(cache: Any) -> list[tuple[str, int, int]]:
    """("attn", K+V bytes per token, 0) and ("ssm", conv bytes, ssm bytes) per cache part, in
    layer order. Transformers keeps d_conv conv columns; a paged state keeps the d_conv - 1 past
    inputs the next step needs (the newest input is the step's own), so one column is dropped.
    LFM2's conv layers keep conv columns (conv_L_cache of them) and no recurrent state: 0."""
    sizes: list[tuple[str, int, int]] = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is not None and hasattr(keys, "shape"):
            sizes.append(("attn", 2 * keys.shape[1] * keys.shape[3] * keys.element_size(), 0))
        conv = [s for s in getattr(layer, "conv_states", {}).values() if s is not None]
        ssm = [s for s in getattr(layer, "recurrent_states", {}).values() if s is not None]
        if conv:
            c = conv[0]
            state_bytes = sum(s.numel() * s.element_size() for s in ssm[:1])
            sizes.append(("ssm", c.shape[1] * (c.shape[2] - 1) * c.element_size(), state_bytes))
    return sizes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_minimax_lightning_layers_match_the_state_transformers_keeps(dtype: str) -> None:
    """MiniMax's "linear_attention" layers (lightning attention) keep one state per request,
    ``[heads, head_dim, head_dim]`` in the model dtype (head_dim derived when unset), which
    transformers keeps in ``MiniMaxCache.linear_cache``; its full layers keep K and V."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    config = tf.MiniMaxConfig(vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                              num_hidden_layers=4, intermediate_size=64, num_local_experts=2,
                              num_experts_per_tok=1, block_size=4, dtype=dtype)
    layout = parse_hf_config(json.loads(config.to_json_string(use_diff=True)), "config.json")
    assert [type(la.life_cycle).__name__ for la in layout.layers] == ["Full", "Ssm", "Full", "Ssm"]
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    cache = model(torch.arange(7)[None], use_cache=True).past_key_values
    states = [s for s in cache.linear_cache if isinstance(s, torch.Tensor)]
    keys = [layer.keys for layer in cache.layers if getattr(layer, "keys", None) is not None]
    assert [la.buffers[0].state_bytes for la in layout.layers if isinstance(la.life_cycle, Ssm)] == [
        s[0].numel() * s.element_size() for s in states] == [4 * 16 * 16 * (4 if dtype == "float32" else 2)] * 2
    assert [la.kv_bytes_per_token for la in layout.layers if isinstance(la.life_cycle, Full)] == [
        2 * k.shape[1] * k.shape[3] * k.element_size() for k in keys]


@pytest.mark.parametrize("family", ["bamba", "falcon_h1", "zamba2", "nemotron_h", "granitemoehybrid", "lfm2",
                                    "lfm2_moe"])
def test_layout_matches_the_cache_transformers_allocates(family: str) -> None:
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    config = _tiny_transformers_configs(tf)[family]
    saved = json.loads(config.to_json_string(use_diff=True))  # what save_pretrained writes
    layout = parse_hf_config(saved, "config.json")
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    cache = model(torch.arange(7)[None], use_cache=True).past_key_values
    ours = [("ssm", *(sum(b.state_bytes for b in la.buffers if b.name == n) for n in ("conv", "ssm")))
            if isinstance(la.life_cycle, Ssm) else ("attn", la.kv_bytes_per_token, 0) for la in layout.layers]
    assert ours == _transformers_cache_sizes(cache)
    assert all(la.life_cycle in (Full(), Ssm()) for la in layout.layers)
