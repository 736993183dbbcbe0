"""The built-in model catalog: layouts of popular (mostly hybrid) models.

Facts (layer counts, KV heads, head dims, windows, layer patterns, state shapes, context
lengths) were checked against the models' published configs and reference implementations;
values not confirmed by a primary source are listed in each entry's ``unverified``. All
caches are bf16 unless noted. Only cache-holding layers are listed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hybridkv.core.errors import ConfigError
from hybridkv.layouts.spec import LayerSpec, ModelLayout, attention_layer, mla_layer, ssm_layer
from hybridkv.lifecycles import Chunked, Full, LifeCycle, Sliding

BF16 = 2


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """A catalog model: how to build its layout and what it is."""

    name: str
    hf_repo: str
    build: Callable[[], tuple[LayerSpec, ...]]
    max_position_embeddings: int
    description: str
    notes: tuple[str, ...] = ()
    unverified: tuple[str, ...] = ()
    # parameters used per token (MoE: active, not total), from the model card / name; the
    # simulator's cost model reads 2 x this many weight bytes (bf16) and FLOPs per token
    active_params: float = field(kw_only=True)

    def layout(self) -> ModelLayout:
        return ModelLayout(self.name, self.build(), self.max_position_embeddings,
                           f"catalog:{self.name} ({self.hf_repo})", self.notes, self.unverified)


def _attn(n: int, kv: int, hd: int, is_full: Callable[[int], bool], local: LifeCycle,
          ) -> Callable[[], tuple[LayerSpec, ...]]:
    """n layers; layer i is full attention if is_full(i), else the ``local`` life cycle."""
    def build() -> tuple[LayerSpec, ...]:
        full, other = attention_layer(kv, hd, BF16, Full()), attention_layer(kv, hd, BF16, local)
        return tuple(full if is_full(i) else other for i in range(n))
    return build


def _all_full(n: int, kv: int, hd: int) -> Callable[[], tuple[LayerSpec, ...]]:
    return _attn(n, kv, hd, lambda i: True, Full())


def _hybrid_ssm(n: int, kv: int, hd: int, is_attn: Callable[[int], bool], state: LayerSpec,
                ) -> Callable[[], tuple[LayerSpec, ...]]:
    def build() -> tuple[LayerSpec, ...]:
        full = attention_layer(kv, hd, BF16, Full())
        return tuple(full if is_attn(i) else state for i in range(n))
    return build


def _nemotron_h() -> tuple[LayerSpec, ...]:
    pattern = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    mamba = ssm_layer(18432, 524288, BF16, 4)  # config: mamba_ssm_cache_dtype float32
    full = attention_layer(2, 128, BF16, Full())
    return tuple(mamba if c == "M" else full for c in pattern if c in "M*")


def _issue_15401() -> tuple[LayerSpec, ...]:
    swa, full = Sliding(128), Full()
    comp = Sliding(8)
    return (tuple(attention_layer(1, 288, BF16, swa) for _ in range(20))
            + tuple(attention_layer(1, 256, BF16, full) for _ in range(20))
            + tuple(attention_layer(1, 64, BF16, comp) for _ in range(20)))


_GEMMA3 = "5 sliding : 1 full (layer i full iff (i+1) % 6 == 0)"
_GPT_OSS = ("learned attention sinks are per-head logits (weights), not sink tokens: no KV "
            "cost, sink_tokens = 0")
_NO_SIZE = "parameter count from the model name, not a fetched source"

ENTRIES: tuple[CatalogEntry, ...] = (
    CatalogEntry("llama-3.1-8b", "meta-llama/Llama-3.1-8B", _all_full(32, 8, 128), 131072,
                 "32 full attention, GQA 8 x 128", active_params=8e9),
    CatalogEntry("llama-3.1-70b", "meta-llama/Llama-3.1-70B", _all_full(80, 8, 128), 131072,
                 "80 full attention, GQA 8 x 128", active_params=70e9),
    CatalogEntry("mistral-7b-v0.1", "mistralai/Mistral-7B-v0.1",
                 _attn(32, 8, 128, lambda i: False, Sliding(4096)), 32768,
                 "32 sliding window 4096",
                 unverified=("torch_dtype bf16 seen only in fine-tune copies of the config",
                             "whether serving engines should apply SWA for v0.1 is contested"),
                 active_params=7.3e9),
    CatalogEntry("gemma-2-9b", "google/gemma-2-9b",
                 _attn(42, 8, 256, lambda i: i % 2 == 1, Sliding(4096)), 8192,
                 "21 sliding 4096 / 21 full, alternating (even layers sliding)",
                 unverified=("torch_dtype of the base repo",), active_params=9e9),
    CatalogEntry("gemma-2-27b", "google/gemma-2-27b",
                 _attn(46, 16, 128, lambda i: i % 2 == 1, Sliding(4096)), 8192,
                 "23 sliding 4096 / 23 full, alternating (even layers sliding)",
                 unverified=("torch_dtype of the base repo",), active_params=27e9),
    CatalogEntry("gemma-3-1b", "google/gemma-3-1b-pt",
                 _attn(26, 1, 256, lambda i: (i + 1) % 6 == 0, Sliding(512)), 32768,
                 f"22 sliding 512 / 4 full; {_GEMMA3}", active_params=1e9),
    CatalogEntry("gemma-3-4b", "google/gemma-3-4b-pt",
                 _attn(34, 4, 256, lambda i: (i + 1) % 6 == 0, Sliding(1024)), 131072,
                 f"29 sliding 1024 / 5 full; {_GEMMA3}", active_params=4e9),
    CatalogEntry("gemma-3-12b", "google/gemma-3-12b-pt",
                 _attn(48, 8, 256, lambda i: (i + 1) % 6 == 0, Sliding(1024)), 131072,
                 f"40 sliding 1024 / 8 full; {_GEMMA3}", active_params=12e9),
    CatalogEntry("gemma-3-27b", "google/gemma-3-27b-pt",
                 _attn(62, 16, 128, lambda i: (i + 1) % 6 == 0, Sliding(1024)), 131072,
                 f"52 sliding 1024 / 10 full; {_GEMMA3}", active_params=27e9),
    CatalogEntry("gpt-oss-20b", "openai/gpt-oss-20b",
                 _attn(24, 8, 64, lambda i: i % 2 == 1, Sliding(128)), 131072,
                 "12 sliding 128 / 12 full, alternating from sliding", (_GPT_OSS,), (_NO_SIZE,),
                 active_params=3.6e9),
    CatalogEntry("gpt-oss-120b", "openai/gpt-oss-120b",
                 _attn(36, 8, 64, lambda i: i % 2 == 1, Sliding(128)), 131072,
                 "18 sliding 128 / 18 full, alternating from sliding", (_GPT_OSS,), (_NO_SIZE,),
                 active_params=5.1e9),
    CatalogEntry("llama-4-scout", "meta-llama/Llama-4-Scout-17B-16E-Instruct",
                 _attn(48, 8, 128, lambda i: i % 4 == 3, Chunked(8192)), 10485760,
                 "36 chunked-local 8192 / 12 global NoPE (every 4th layer)",
                 ("max_position_embeddings is 262144 for the base checkpoint",),
                 active_params=17e9),
    CatalogEntry("qwen3-next-80b-a3b", "Qwen/Qwen3-Next-80B-A3B-Instruct",
                 _hybrid_ssm(48, 2, 256, lambda i: (i + 1) % 4 == 0,
                             ssm_layer(24576, 524288, BF16, BF16)), 262144,
                 "36 Gated DeltaNet (1,097,728 B state) / 12 full, full iff (i+1) % 4 == 0",
                 active_params=3e9),
    CatalogEntry("jamba-1.5-mini", "ai21labs/AI21-Jamba-1.5-Mini",
                 _hybrid_ssm(32, 8, 128, lambda i: i % 8 == 4,
                             ssm_layer(24576, 131072, BF16, BF16)), 262144,
                 "28 Mamba-1 (311,296 B state) / 4 full at layers 4, 12, 20, 28",
                 unverified=("layout taken from Jamba-v0.1; the 1.5-Mini config.json was not "
                             "found", "torch_dtype bf16 seen in derived configs only"),
                 active_params=12e9),
    CatalogEntry("deepseek-v3", "deepseek-ai/DeepSeek-V3",
                 lambda: tuple(mla_layer(512, 64, BF16) for _ in range(61)), 163840,
                 "61 MLA, latent 512 + rope 64 = 1,152 B/token/layer",
                 ("an MTP module used for speculative decoding adds one more MLA layer",),
                 (_NO_SIZE,), active_params=37e9),
    CatalogEntry("command-r7b", "CohereForAI/c4ai-command-r7b-12-2024",
                 _attn(32, 8, 128, lambda i: i % 4 == 3, Sliding(4096)), 131072,
                 "24 sliding 4096 / 8 full NoPE (every 4th layer)",
                 unverified=("max_position_embeddings: copies disagree (8192, 16384); "
                             "128K per the model listing is used",), active_params=7e9),
    CatalogEntry("phi-3.5-mini", "microsoft/Phi-3.5-mini-instruct", _all_full(32, 32, 96), 131072,
                 "32 full (config window 262144 exceeds max positions: inactive)", (), (_NO_SIZE,),
                 active_params=3.8e9),
    CatalogEntry("qwen2.5-7b", "Qwen/Qwen2.5-7B", _all_full(28, 4, 128), 131072,
                 "28 full (use_sliding_window false)", (), (_NO_SIZE,), active_params=7.6e9),
    CatalogEntry("ministral-8b", "mistralai/Ministral-8B-Instruct-2410",
                 _attn(36, 8, 128, lambda i: i % 4 == 0, Sliding(32768)), 32768,
                 "27 sliding 32768 / 9 full (1 full : 3 sliding)",
                 ("max_position_embeddings 32768 from the legacy config.json; docs say 128K",),
                 ("position of the full layer in each group of 4",
                  "128K context from docs text, not a config value"), active_params=8e9),
    CatalogEntry("nemotron-3-nano-30b-a3b", "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B",
                 _nemotron_h, 262144,
                 "23 Mamba-2 (fp32 SSM state, 2,134,016 B) / 6 full; 23 MoE layers hold no cache",
                 unverified=("values from derived configs, not the nvidia repo file",
                             _NO_SIZE), active_params=3e9),
    CatalogEntry("issue-15401", "(illustrative)", _issue_15401, 137984,
                 "the windowed-pool deadlock shape: window 128 / full / window 8, 20 layers each",
                 ("layer groups, windows and max_seq_len as reported in the production bug; "
                  "bytes per token are illustrative, chosen so the three groups get distinct "
                  "slot sizes",), active_params=37e9),
)

BY_NAME: dict[str, CatalogEntry] = {e.name: e for e in ENTRIES}


def catalog_layout(name: str) -> ModelLayout:
    """The catalog layout called ``name`` (case-insensitive); ConfigError listing the names."""
    entry = BY_NAME.get(name.lower())
    if entry is None:
        raise ConfigError(f"unknown model {name!r}: not in the catalog and not a file. "
                          f"Catalog models: {', '.join(BY_NAME)} (see `hybridkv models`)")
    return entry.layout()
