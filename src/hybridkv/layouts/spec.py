"""Model layouts: the ordered cache-holding layers of a model, each with its life cycle and
buffers, plus the helpers that build attention, MLA and SSM layers from model dimensions.

Only layers that hold a cache appear (an FFN-only layer of a Nemotron-H model does not);
``layer_id`` everywhere is the index into ``ModelLayout.layers``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_BYTES, MAX_LAYERS, check_max
from hybridkv.lifecycles import Full, LifeCycle, Ssm

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
        check_max(f"buffer {self.name!r}: bytes", max(self.bytes_per_token, self.state_bytes), MAX_BYTES,
                  "no cache buffer is that large")

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
        if per_token != self.life_cycle.per_token or (
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
        check_max(f"layout {self.name!r}: cache-holding layers", len(self.layers), MAX_LAYERS,
                  "no model has that many layers")

    def kv_bytes_per_token(self) -> int:
        """Bytes one token adds across all attention layers (before any window applies)."""
        return sum(layer.kv_bytes_per_token for layer in self.layers)


def _check_bytes(what: str, factors: str, value: int) -> None:
    """Name the dimensions a helper multiplied when the product is past MAX_BYTES (the
    buffer names k, v, conv... are the helper's, not the user's)."""
    check_max(f"{what} ({factors})", value, MAX_BYTES, "check those dimensions")


def attention_layer(kv_heads: int, head_dim: int, elem_bytes: int, lc: LifeCycle) -> LayerSpec:
    """Standard attention: separate K and V buffers of kv_heads x head_dim elements per token."""
    per = kv_heads * head_dim * elem_bytes
    _check_bytes("attention layer bytes per token", f"{kv_heads} KV heads x head_dim {head_dim} x {elem_bytes} B",
                 per)
    return LayerSpec(lc, (BufferSpec("k", per), BufferSpec("v", per)))


def mla_layer(kv_lora_rank: int, rope_dim: int, elem_bytes: int) -> LayerSpec:
    """Multi-head latent attention (absorbed): one latent head per token, ``[c_kv ; k_pe]``
    (the compressed KV, then the decoupled RoPE key), as an absorbed MLA kernel reads it: K is
    the whole latent and V its first ``kv_lora_rank`` channels."""
    latent, rope = kv_lora_rank * elem_bytes, rope_dim * elem_bytes
    _check_bytes("MLA latent bytes per token", f"kv_lora_rank {kv_lora_rank} x {elem_bytes} B", latent)
    _check_bytes("MLA rope key bytes per token", f"rope dim {rope_dim} x {elem_bytes} B", rope)
    return LayerSpec(Full(), (BufferSpec("latent", latent + rope),))


def ssm_layer(conv_elems: int, ssm_elems: int, conv_bytes: int, ssm_bytes: int) -> LayerSpec:
    """A recurrent layer: a convolution state and an SSM / linear-attention state per request.
    A convolution of width 1 keeps no past inputs: no conv buffer then."""
    conv, state = conv_elems * conv_bytes, ssm_elems * ssm_bytes
    _check_bytes("ssm conv state bytes", f"{conv_elems} conv state elements x {conv_bytes} B", conv)
    _check_bytes("ssm state bytes", f"{ssm_elems} state elements x {ssm_bytes} B", state)
    conv_buffer = (BufferSpec("conv", state_bytes=conv),) if conv else ()
    return LayerSpec(Ssm(), (*conv_buffer, BufferSpec("ssm", state_bytes=state)))
