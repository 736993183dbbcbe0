"""Model layouts: the ordered cache-holding layers of a model, each with its life cycle and
buffers, plus the helpers that build attention, MLA and SSM layers from model dimensions.

Only layers that hold a cache appear (an FFN-only layer of a Nemotron-H model does not);
``layer_id`` everywhere is the index into ``ModelLayout.layers``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybridkv.errors import ConfigError
from hybridkv.lifecycle import LifeCycle

DTYPE_BYTES: dict[str, int] = {
    "float32": 4, "fp32": 4, "float": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "float8": 1, "fp8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1,
}


def dtype_bytes(name: str, where: str) -> int:
    """Bytes per element of a dtype name; ConfigError naming ``where`` if unknown."""
    if not isinstance(name, str):
        raise ConfigError(f"{where}: dtype must be a string such as 'bfloat16', got {name!r}")
    key = name.removeprefix("torch.").lower()
    if key not in DTYPE_BYTES:
        raise ConfigError(f"{where}: unknown dtype {name!r}; use one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


@dataclass(frozen=True, slots=True)
class BufferSpec:
    """One cache buffer of a layer (K, V, an MLA latent, an SSM state).

    Attention buffers grow with tokens (``bytes_per_token``); SSM buffers are one state per
    request (``state_bytes``). Exactly one of the two is non-zero.
    """

    name: str
    bytes_per_token: int = 0
    state_bytes: int = 0

    def __post_init__(self) -> None:
        if self.bytes_per_token < 0 or self.state_bytes < 0:
            raise ConfigError(f"buffer {self.name!r}: sizes must be >= 0")
        if (self.bytes_per_token > 0) == (self.state_bytes > 0):
            raise ConfigError(f"buffer {self.name!r}: give exactly one of bytes_per_token "
                              f"({self.bytes_per_token}) or state_bytes ({self.state_bytes}) > 0")

    def page_bytes(self, tokens_per_block: int) -> int:
        """Bytes of one slot of this buffer for one layer."""
        return self.bytes_per_token * tokens_per_block if self.bytes_per_token else self.state_bytes


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """A cache-holding layer: its life cycle and its buffers."""

    life_cycle: LifeCycle
    buffers: tuple[BufferSpec, ...]

    def __post_init__(self) -> None:
        if not self.buffers:
            raise ConfigError("a layer needs at least one buffer")
        per_token = any(b.bytes_per_token for b in self.buffers)
        if per_token == self.life_cycle.is_ssm or (
            per_token and not all(b.bytes_per_token for b in self.buffers)
        ):
            raise ConfigError(f"{self.life_cycle.describe()} layer: attention layers need "
                              "per-token buffers, ssm layers per-request state buffers")

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(b.bytes_per_token for b in self.buffers)

    @property
    def state_bytes(self) -> int:
        return sum(b.state_bytes for b in self.buffers)

    def page_bytes(self, tokens_per_block: int) -> int:
        return sum(b.page_bytes(tokens_per_block) for b in self.buffers)


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """A model's cache-holding layers in order, with where the facts came from."""

    name: str
    layers: tuple[LayerSpec, ...]
    max_position_embeddings: int | None = None
    source: str = ""
    notes: tuple[str, ...] = field(default=())
    unverified: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError(f"layout {self.name!r} has no cache-holding layers")

    def kv_bytes_per_token(self) -> int:
        """Bytes one token adds across all attention layers (before any window applies)."""
        return sum(layer.kv_bytes_per_token for layer in self.layers)


def attention_layer(kv_heads: int, head_dim: int, elem_bytes: int, lc: LifeCycle) -> LayerSpec:
    """Standard attention: separate K and V buffers of kv_heads x head_dim elements per token."""
    per = kv_heads * head_dim * elem_bytes
    return LayerSpec(lc, (BufferSpec("k", per), BufferSpec("v", per)))


def mla_layer(kv_lora_rank: int, rope_dim: int, elem_bytes: int) -> LayerSpec:
    """Multi-head latent attention (absorbed): a latent and a decoupled RoPE key per token."""
    return LayerSpec(
        LifeCycle.full(),
        (BufferSpec("kv_latent", kv_lora_rank * elem_bytes), BufferSpec("k_rope", rope_dim * elem_bytes)),
    )


def ssm_layer(conv_elems: int, ssm_elems: int, conv_bytes: int, ssm_bytes: int) -> LayerSpec:
    """A recurrent layer: a convolution state and an SSM / linear-attention state per request."""
    return LayerSpec(
        LifeCycle.ssm(),
        (BufferSpec("conv", state_bytes=conv_elems * conv_bytes),
         BufferSpec("ssm", state_bytes=ssm_elems * ssm_bytes)),
    )
