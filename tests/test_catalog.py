"""The built-in catalog: every entry builds, and per-request bytes match the hand arithmetic in
/work/shared/reference/model_catalog.md section 4 (bf16, no page rounding)."""

from __future__ import annotations

import pytest

from hybridkv.core.errors import ConfigError
from hybridkv.layouts.catalog import BY_NAME, ENTRIES, CatalogEntry, catalog_layout
from hybridkv.layouts.spec import LayerSpec, ModelLayout
from hybridkv.lifecycles import Chunked, Full, LifeCycle, Sliding, Ssm
from hybridkv.planning.report import ideal_bytes_per_request

T32K, T128K = 32 * 1024, 128 * 1024

REQUIRED = [
    "llama-3.1-8b", "llama-3.1-70b", "mistral-7b-v0.1", "gemma-2-27b", "gemma-3-1b", "gemma-3-27b",
    "gpt-oss-20b", "gpt-oss-120b", "llama-4-scout", "qwen3-next-80b-a3b", "jamba-1.5-mini", "deepseek-v3",
]


def all_full(layout: ModelLayout) -> ModelLayout:
    """The same layout with every attention layer turned into full attention (SSM kept)."""
    layers = tuple(layer if isinstance(layer.life_cycle, Ssm) else LayerSpec(Full(), layer.buffers)
                   for layer in layout.layers)
    return ModelLayout(f"{layout.name}-all-full", layers, layout.max_position_embeddings)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_every_entry_builds(entry: CatalogEntry) -> None:
    layout = entry.layout()
    assert layout.name == entry.name
    assert layout.layers
    assert layout.max_position_embeddings == entry.max_position_embeddings
    assert layout.source.startswith(f"catalog:{entry.name} ")
    assert layout.unverified == entry.unverified
    assert entry.description
    for layer in layout.layers:
        assert (layer.kv_bytes_per_token > 0) != isinstance(layer.life_cycle, Ssm)
        assert (layer.state_bytes > 0) == isinstance(layer.life_cycle, Ssm)


def test_names_are_unique_lowercase() -> None:
    names = [e.name for e in ENTRIES]
    assert len(names) == len(set(names))
    assert all(n == n.lower() for n in names)
    assert list(BY_NAME) == names


@pytest.mark.parametrize("name", REQUIRED)
def test_required_names_exist(name: str) -> None:
    assert name in BY_NAME
    assert catalog_layout(name).name == name


def test_lookup_is_case_insensitive() -> None:
    assert catalog_layout("Gemma-3-27B").layers == catalog_layout("gemma-3-27b").layers


def test_unknown_name_lists_the_catalog() -> None:
    with pytest.raises(ConfigError, match="unknown model 'gemma-9'") as info:
        catalog_layout("gemma-9")
    assert all(name in str(info.value) for name in REQUIRED)


@pytest.mark.parametrize(("name", "layers", "full", "kv_bytes", "window"), [
    ("llama-3.1-8b", 32, 32, 4096, None),
    ("llama-3.1-70b", 80, 80, 4096, None),
    ("mistral-7b-v0.1", 32, 0, 4096, Sliding(4096)),
    ("gemma-2-27b", 46, 23, 8192, Sliding(4096)),
    ("gemma-3-1b", 26, 4, 1024, Sliding(512)),
    ("gemma-3-27b", 62, 10, 8192, Sliding(1024)),
    ("gpt-oss-20b", 24, 12, 2048, Sliding(128)),
    ("gpt-oss-120b", 36, 18, 2048, Sliding(128)),
    ("llama-4-scout", 48, 12, 4096, Chunked(8192)),
])
def test_attention_only_shapes(name: str, layers: int, full: int, kv_bytes: int,
                               window: LifeCycle | None) -> None:
    layout = catalog_layout(name)
    assert len(layout.layers) == layers
    lcs = [layer.life_cycle for layer in layout.layers]
    assert sum(isinstance(lc, Full) for lc in lcs) == full
    assert {lc for lc in lcs if not isinstance(lc, Full)} == ({window} if window else set())
    assert {layer.kv_bytes_per_token for layer in layout.layers} == {kv_bytes}


# --- per-request bytes: section 4 of the reference, written as arithmetic -------------------

GEMMA3_27B_32K = 52 * 8192 * 1024 + 10 * 8192 * 32768
GEMMA3_27B_128K = 52 * 8192 * 1024 + 10 * 8192 * 131072
GPT_OSS_20B_32K = 12 * 2048 * 128 + 12 * 2048 * 32768
GPT_OSS_20B_128K = 12 * 2048 * 128 + 12 * 2048 * 131072
SCOUT_32K = 36 * 4096 * 8192 + 12 * 4096 * 32768
SCOUT_128K = 36 * 4096 * 8192 + 12 * 4096 * 131072


@pytest.mark.parametrize(("name", "length", "hybrid", "hybrid_literal", "full", "full_literal"), [
    ("gemma-3-27b", T32K, GEMMA3_27B_32K, 3_120_562_176, 62 * 8192 * 32768, 16_642_998_272),
    ("gemma-3-27b", T128K, GEMMA3_27B_128K, 11_173_625_856, 62 * 8192 * 131072, 66_571_993_088),
    ("gpt-oss-20b", T32K, GPT_OSS_20B_32K, 808_452_096, 24 * 2048 * 32768, 1_610_612_736),
    ("gpt-oss-20b", T128K, GPT_OSS_20B_128K, 3_224_371_200, 24 * 2048 * 131072, 6_442_450_944),
    ("llama-4-scout", T32K, SCOUT_32K, 2_818_572_288, 48 * 4096 * 32768, 6_442_450_944),
    ("llama-4-scout", T128K, SCOUT_128K, 7_650_410_496, 48 * 4096 * 131072, 25_769_803_776),
])
def test_hybrid_savings_vs_all_full(name: str, length: int, hybrid: int, hybrid_literal: int,
                                    full: int, full_literal: int) -> None:
    assert (hybrid, full) == (hybrid_literal, full_literal)  # the arithmetic is the reference's
    layout = catalog_layout(name)
    assert ideal_bytes_per_request(layout, length) == hybrid
    assert ideal_bytes_per_request(all_full(layout), length) == full
    assert layout.kv_bytes_per_token() * length == full


def test_savings_percentages_match_the_reference() -> None:
    def saving(name: str, length: int) -> float:
        layout = catalog_layout(name)
        return round(100 * (1 - ideal_bytes_per_request(layout, length)
                            / ideal_bytes_per_request(all_full(layout), length)), 2)
    assert saving("gemma-3-27b", T32K) == 81.25
    assert saving("gemma-3-27b", T128K) == 83.22
    assert saving("gpt-oss-20b", T32K) == 49.8
    assert saving("gpt-oss-20b", T128K) == 49.95
    assert saving("llama-4-scout", T32K) == 56.25
    assert saving("llama-4-scout", T128K) == 70.31


@pytest.mark.parametrize(("name", "length", "expected"), [
    # full 12 x 2048 x T + 36 Gated DeltaNet states of (24,576 + 524,288) x 2 B
    ("qwen3-next-80b-a3b", T32K, 12 * 2048 * 32768 + 36 * 1_097_728),
    ("qwen3-next-80b-a3b", T128K, 12 * 2048 * 131072 + 36 * 1_097_728),
    # full 4 x 4096 x T + 28 Mamba-1 states of (24,576 + 131,072) x 2 B
    ("jamba-1.5-mini", T32K, 4 * 4096 * 32768 + 28 * 311_296),
    ("jamba-1.5-mini", T128K, 4 * 4096 * 131072 + 28 * 311_296),
    # full 6 x 1024 x T + 23 Mamba-2 states with fp32 SSM: 18,432 x 2 + 524,288 x 4 B
    ("nemotron-3-nano-30b-a3b", T32K, 6 * 1024 * 32768 + 23 * 2_134_016),
    ("nemotron-3-nano-30b-a3b", T128K, 6 * 1024 * 131072 + 23 * 2_134_016),
    # 61 MLA x (512 + 64) x 2 B x T
    ("deepseek-v3", T32K, 61 * 1152 * 32768),
    ("deepseek-v3", T128K, 61 * 1152 * 131072),
    # sliding 23 x 8192 x 4096 + full 23 x 8192 x T
    ("gemma-2-27b", T32K, 23 * 8192 * 4096 + 23 * 8192 * 32768),
    ("mistral-7b-v0.1", T128K, 32 * 4096 * 4096),
])
def test_ideal_bytes_other_models(name: str, length: int, expected: int) -> None:
    assert ideal_bytes_per_request(catalog_layout(name), length) == expected


def test_ideal_bytes_reference_literals() -> None:
    ref = {
        ("qwen3-next-80b-a3b", T32K): 844_824_576, ("qwen3-next-80b-a3b", T128K): 3_260_743_680,
        ("jamba-1.5-mini", T32K): 545_587_200, ("jamba-1.5-mini", T128K): 2_156_199_936,
        ("nemotron-3-nano-30b-a3b", T32K): 250_408_960, ("nemotron-3-nano-30b-a3b", T128K): 854_388_736,
        ("deepseek-v3", T32K): 2_302_672_896, ("deepseek-v3", T128K): 9_210_691_584,
        ("gemma-2-27b", T32K): 6_945_767_424, ("mistral-7b-v0.1", T128K): 536_870_912,
        ("gemma-3-1b", T32K): 145_752_064, ("command-r7b", T128K): 4_697_620_480,
        ("ministral-8b", T128K): 8_455_716_864, ("phi-3.5-mini", T128K): 51_539_607_552,
    }
    got = {key: ideal_bytes_per_request(catalog_layout(key[0]), key[1]) for key in ref}
    assert got == ref


def test_ssm_state_sizes() -> None:
    def state(name: str) -> int:
        return next(layer.state_bytes for layer in catalog_layout(name).layers if isinstance(layer.life_cycle, Ssm))
    assert state("qwen3-next-80b-a3b") == (24_576 + 524_288) * 2 == 1_097_728
    assert state("jamba-1.5-mini") == (24_576 + 131_072) * 2 == 311_296
    assert state("nemotron-3-nano-30b-a3b") == 18_432 * 2 + 524_288 * 4 == 2_134_016
