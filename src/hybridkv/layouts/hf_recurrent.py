"""What a recurrent layer ("linear_attention", legacy "mamba", LFM2's "conv") holds per
request, by ``model_type``: a gated-delta-net state (Qwen3-Next, Qwen3.5), a Mamba-2 state
(Nemotron-H, Bamba, GraniteMoeHybrid, Falcon-H1, Zamba2: each family names the fields its own
way), a Mamba-1 state (Jamba), a short-convolution state alone (LFM2, LFM2-MoE) or a
lightning-attention state alone (MiniMax). A model_type hybridkv does not know is an error
naming the field."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_BYTES, check_max
from hybridkv.layouts.hf_fields import ConfigFields
from hybridkv.layouts.spec import BufferSpec, LayerSpec, dtype_bytes, ssm_layer
from hybridkv.lifecycles import Ssm

RECURRENT = "linear_attention"


class _Mamba2(NamedTuple):
    """A Mamba-2 mixer's dimensions, whatever its family calls the fields. Its conv state holds
    the last d_conv - 1 inputs of x, B and C; its SSM state one d_state vector per head channel."""

    heads: int
    head_dim: int
    groups: int
    d_state: int
    d_conv: int

    def conv_elems(self) -> int:
        return (self.heads * self.head_dim + 2 * self.groups * self.d_state) * (self.d_conv - 1)

    def ssm_elems(self) -> int:
        return self.heads * self.head_dim * self.d_state


def _split_heads(cfg: ConfigFields, key: str | None, inner: int, heads: int, inner_fields: str) -> int:
    """The Mamba head dim: field ``key``, or inner / heads where it is "auto", absent or
    derived (``key`` None); heads x head_dim must be the mixer's inner size, as transformers checks."""
    value = "auto" if key is None else cfg.get(key, "auto")
    head_dim = inner // heads if value == "auto" or key is None else cfg.int(key)
    if head_dim * heads != inner:
        raise ConfigError(f"{cfg.path}: field {key or 'n_mamba_heads'!r} gives head dim {head_dim} x {heads} "
                          f"Mamba heads, which must equal the Mamba inner size {inner} ({inner_fields})")
    return head_dim


def _nemotron_h_mamba2(cfg: ConfigFields) -> _Mamba2:
    # transformers 5 still reads the 4.x names mamba_n_groups / mamba_d_conv first
    groups = "mamba_n_groups" if cfg.get("mamba_n_groups") is not None else "n_groups"
    kernel = "mamba_d_conv" if cfg.get("mamba_d_conv") is not None else "conv_kernel"
    return _Mamba2(cfg.int("mamba_num_heads"), cfg.int("mamba_head_dim"), cfg.int(groups, 8),
                   cfg.int("ssm_state_size"), cfg.int(kernel, 4))


def _bamba_mamba2(cfg: ConfigFields, inner: int | None = None,
                  inner_fields: str = "mamba_expand x hidden_size") -> _Mamba2:
    """Bamba and GraniteMoeHybrid (Falcon-H1 with its own inner size)."""
    heads = cfg.int("mamba_n_heads")
    inner = inner or cfg.int("mamba_expand", 2) * cfg.int("hidden_size")
    head_dim = _split_heads(cfg, "mamba_d_head", inner, heads, inner_fields)
    return _Mamba2(heads, head_dim, cfg.int("mamba_n_groups", 1), cfg.int("mamba_d_state"),
                   cfg.int("mamba_d_conv", 4))


def _falcon_h1_mamba2(cfg: ConfigFields) -> _Mamba2:
    # mamba_d_ssm absent: transformers' default 1024; null: mamba_expand x hidden_size
    if "mamba_d_ssm" not in cfg.data:
        return _bamba_mamba2(cfg, 1024, "transformers' default mamba_d_ssm")
    if cfg.data["mamba_d_ssm"] is None:
        return _bamba_mamba2(cfg)
    return _bamba_mamba2(cfg, cfg.int("mamba_d_ssm"), "mamba_d_ssm")


def _zamba2_mamba2(cfg: ConfigFields) -> _Mamba2:
    # transformers derives the head dim (mamba_headdim) and ignores the saved one
    heads = cfg.int("n_mamba_heads")
    inner = cfg.int("mamba_expand", 2) * cfg.int("hidden_size")
    head_dim = _split_heads(cfg, None, inner, heads, "mamba_expand x hidden_size")
    return _Mamba2(heads, head_dim, cfg.int("mamba_ngroups", 1), cfg.int("mamba_d_state"),
                   cfg.int("mamba_d_conv", 4))


_MAMBA2_FAMILIES: dict[str, Callable[[ConfigFields], _Mamba2]] = {
    "nemotron_h": _nemotron_h_mamba2, "bamba": _bamba_mamba2, "granitemoehybrid": _bamba_mamba2,
    "falcon_h1": _falcon_h1_mamba2, "zamba2": _zamba2_mamba2,
}
_GATED_DELTA_NET = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
_MAMBA1 = ("jamba",)
SHORT_CONV = ("lfm2", "lfm2_moe")
LIGHTNING = ("minimax",)
_NOT_REPRESENTED = {"kimi_linear": "Kimi delta attention (KDA)"}


def _lightning_state(cfg: ConfigFields, elem: int) -> LayerSpec:
    """MiniMax's lightning attention: a linear attention whose state is the decayed sum of
    ``k^T v`` per head, ``[heads, head_dim, head_dim]`` in the model dtype, and nothing else
    (no convolution). ``head_dim`` absent (or null / 0): hidden_size / num_attention_heads, as
    transformers derives it."""
    heads = cfg.int("num_attention_heads")
    head_dim = cfg.get("head_dim") or cfg.int("hidden_size") // heads
    state = heads * int(head_dim) * int(head_dim) * elem
    check_max(f"{cfg.path}: lightning attention state bytes (num_attention_heads {heads} x head_dim {head_dim}^2 "
              f"x {elem} B)", state, MAX_BYTES, "check those fields")
    return LayerSpec(Ssm(), (BufferSpec("ssm", state_bytes=state),))


def _short_conv_state(cfg: ConfigFields, elem: int) -> LayerSpec:
    """LFM2's gated short convolution: a depthwise causal conv of ``conv_L_cache`` taps over
    ``hidden_size`` channels (B * x, in the model dtype), and no other state. Transformers keeps
    ``conv_L_cache`` columns, but a decode step reads only the last ``conv_L_cache - 1`` of them
    beside the step's own input (the oldest column falls off before use), so hybridkv keeps
    those ``conv_L_cache - 1`` past inputs, as it does for Mamba-2's ``d_conv - 1``. A width-1
    conv would keep nothing: no cache layer to page, so it is refused by name."""
    hidden, taps = cfg.int("hidden_size"), cfg.int("conv_L_cache", 3, minimum=2)
    conv = hidden * (taps - 1) * elem
    check_max(f"{cfg.path}: short conv state bytes (hidden_size {hidden} x (conv_L_cache {taps} - 1) x "
              f"{elem} B)", conv, MAX_BYTES, "check those fields")
    return LayerSpec(Ssm(), (BufferSpec("conv", state_bytes=conv),))


def recurrent_state(cfg: ConfigFields, field: str) -> LayerSpec:
    """The state one recurrent layer keeps per request, chosen by ``model_type``; one that
    hybridkv does not know is an error naming ``field``, never a guess."""
    mt = cfg.model_type()
    elem = dtype_bytes(cfg.get("torch_dtype", cfg.get("dtype", "bfloat16")), f"{cfg.path}: dtype")
    ssm_elem = elem
    if cfg.get("mamba_ssm_cache_dtype") not in (None, "auto"):
        ssm_elem = dtype_bytes(cfg.get("mamba_ssm_cache_dtype"), f"{cfg.path}: mamba_ssm_cache_dtype")
    if mt in _GATED_DELTA_NET:
        nk, nv = cfg.int("linear_num_key_heads"), cfg.int("linear_num_value_heads")
        dk, dv = cfg.int("linear_key_head_dim"), cfg.int("linear_value_head_dim")
        conv = (2 * nk * dk + nv * dv) * (cfg.int("linear_conv_kernel_dim", 4) - 1)
        return ssm_layer(conv, nv * dk * dv, elem, ssm_elem)
    if mt in _MAMBA2_FAMILIES:
        m = _MAMBA2_FAMILIES[mt](cfg)
        return ssm_layer(m.conv_elems(), m.ssm_elems(), elem, ssm_elem)
    if mt in _MAMBA1:
        inner = cfg.int("mamba_expand", 2) * cfg.int("hidden_size")
        return ssm_layer(inner * (cfg.int("mamba_d_conv", 4) - 1), inner * cfg.int("mamba_d_state", 16),
                         elem, ssm_elem)
    if mt in SHORT_CONV:
        return _short_conv_state(cfg, elem)
    if mt in LIGHTNING:
        return _lightning_state(cfg, elem)
    known = sorted([*_GATED_DELTA_NET, *_MAMBA2_FAMILIES, *_MAMBA1, *SHORT_CONV, *LIGHTNING])
    why = (f"for model_type {mt!r} it is {_NOT_REPRESENTED[mt]}, which hybridkv cannot represent"
           if mt in _NOT_REPRESENTED else f"model_type {mt!r:.40} is not one hybridkv reads (known: {known})")
    raise ConfigError(f"{cfg.path}: field {field!r} gives recurrent layers ({RECURRENT!r}), whose state "
                      f"depends on model_type; {why}")
