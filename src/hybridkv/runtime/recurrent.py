"""Recurrent layers over state pages: gated delta nets (Qwen3-Next, Qwen3.5), Mamba-2
mixers (Bamba and the families built like it), Mamba-1 mixers (Jamba), gated short
convolutions (LFM2, LFM2-MoE) and lightning attention (MiniMax: a linear attention whose
state is one decayed ``k^T v`` per head, no convolution; its module reads and sets that state
through ``get_linear_cache`` / ``set_linear_cache`` and continues any state token by token).

A recurrent layer mixes tokens in order, so the packed sequence is cut into its requests'
runs and the model's own module runs once per run, handed a one-request cache object that
holds the request's state gathered from its pages (``states.py``); afterwards the state goes
back to the pages. A decode step (every request one token, each with a state) runs the module
once for the whole batch instead: the packed tokens become a batch of one-token sequences, and
the states of all rows are gathered and scattered by slots looked up on the device.

The module's forward (projections, the causal convolution, the gated
delta rule or the selective scan, the gated norm) is transformers' own, so only the cache it
talks to changes. The first three keep a convolution state ``[conv_dim, kernel - 1]`` and a
recurrent state whose shape the module's sizes give (``recurrent_shape``); a short
convolution keeps its convolution state alone (``[hidden_size, conv_L_cache - 1]``).

Jamba's Mamba-1 mixer differs twice. Its decoder layer calls it without the keywords of the
layer's own call, passing only ``past_key_values`` on as ``cache_params``, so the engine wraps
that layer to hand the step over there (LFM2's decoder layer calls its short convolution the
same way). And its full-sequence scan starts from a zero state whatever the cache holds, so a
run that continues a state goes through ``mamba1.py``'s scan from that state instead (through
the zero-start scan, the scenario test's chunked prefills, prefix hit and fork are 4.1e-5 off).

The convolution keeps the last ``kernel - 1`` inputs per channel in hybridkv's layout (what a
next token needs); the module's cache convention is ``kernel`` columns whose first one is
never read, so a zero column is put in front on the way in and dropped on the way out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hybridkv.core.errors import ConfigError
from hybridkv.runtime import mamba1
from hybridkv.runtime.states import StateBuffer

if TYPE_CHECKING:
    import torch


def recurrent_shape(module: Any) -> tuple[int, ...] | None:
    """The recurrent state of one request: ``[heads, key dim, value dim]`` for a gated delta
    net, ``[heads, head dim, state size]`` for Mamba-2, ``[inner size, state size]`` for
    Mamba-1, ``[heads, head dim, head dim]`` for lightning attention; None for another module."""
    if _is_lightning(module):
        return (module.num_attention_heads, module.head_dim, module.head_dim)
    if all(hasattr(module, a) for a in ("num_v_heads", "head_k_dim", "head_v_dim")):
        return (module.num_v_heads, module.head_k_dim, module.head_v_dim)
    if all(hasattr(module, a) for a in ("num_heads", "head_dim", "ssm_state_size")):
        return (module.num_heads, module.head_dim, module.ssm_state_size)
    if _is_mamba1(module):
        return (module.intermediate_size, module.ssm_state_size)
    return None


def _is_mamba1(module: Any) -> bool:
    """A Mamba-1 mixer (Jamba's): one SSM channel per inner channel, a low-rank time step."""
    return all(hasattr(module, a) for a in ("intermediate_size", "ssm_state_size", "time_step_rank")) \
        and not hasattr(module, "num_heads")


def _is_lightning(module: Any) -> bool:
    """MiniMax's lightning attention (``MiniMaxLightningAttention``): per-head decays
    (``slope_rate``), a gated output, and one ``k^T v`` state per head."""
    return all(hasattr(module, a) for a in ("slope_rate", "block_size", "qkv_proj", "output_gate", "head_dim"))


def _is_short_conv(module: Any) -> bool:
    """LFM2's gated short convolution (``Lfm2ShortConv``): a depthwise ``conv`` over B * x,
    and no state besides the convolution's."""
    return all(hasattr(module, a) for a in ("conv", "in_proj", "conv_kernel_size")) and not hasattr(module, "conv1d")


def _conv_channels(module: Any) -> int | None:
    """Channels of the causal convolution: ``conv_dim`` (x, B and C for Mamba-2), the inner
    size (x alone, Mamba-1) or the hidden size (B * x, a short convolution)."""
    if hasattr(module, "conv_dim"):
        return int(module.conv_dim)
    if _is_short_conv(module):
        return int(module.conv.in_channels)
    return int(module.intermediate_size) if _is_mamba1(module) else None


class OneRequestCache:
    """The cache interface a recurrent module uses, for one request (or a decode step's batch)
    and one layer: ``has_previous_state``, ``layers[i].conv_states / recurrent_states /
    record_past``, ``update_conv_state`` and ``update_recurrent_state``; lightning attention's
    ``get_linear_cache`` / ``set_linear_cache`` (its state, None for a fresh request)."""

    record_past = False

    def __init__(self, layer_idx: int, kernel: int, conv: torch.Tensor | None, recurrent: torch.Tensor | None) -> None:
        self.layers = {layer_idx: self}
        self.kernel = kernel
        self.conv_states: dict[int, torch.Tensor | None] = {0: conv}
        self.recurrent_states: dict[int, torch.Tensor | None] = {0: recurrent}

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.conv_states[0] is not None

    def update_conv_state(self, x: torch.Tensor, layer_idx: int, **kwargs: Any) -> torch.Tensor:
        """The inputs the convolution sees (the kept ones, then ``x``); keeps the last ``kernel``."""
        import torch

        old = self.conv_states[0]
        full = x if old is None else torch.cat([old, x], dim=-1)
        if full.shape[-1] < self.kernel:
            full = torch.nn.functional.pad(full, (self.kernel - full.shape[-1], 0))
        self.conv_states[0] = full[..., -self.kernel:].clone()
        return full

    def update_recurrent_state(self, state: torch.Tensor, layer_idx: int, **kwargs: Any) -> torch.Tensor:
        self.recurrent_states[0] = state
        return state

    def get_linear_cache(self, layer_idx: int) -> torch.Tensor | None:
        return self.recurrent_states[0]

    def set_linear_cache(self, layer_idx: int, state: torch.Tensor) -> None:
        self.recurrent_states[0] = state


Fetch = Callable[[str], "torch.Tensor"]  # a state buffer's bytes for the rows, [rows, nbytes] uint8
Put = Callable[[str, "torch.Tensor"], None]  # write them back


def _load(module: Any, buffers: dict[str, StateBuffer], fetch: Fetch, dtype: Any) -> OneRequestCache:
    """The cache of the rows ``fetch`` reads (a batch of one request, or of a decode step's)."""
    import torch

    kernel = module.hybridkv_conv_kernel
    conv = None
    if "conv" in buffers:  # (lightning attention keeps no convolution)
        raw = fetch("conv")
        conv = raw.view(dtype).view(raw.shape[0], module.hybridkv_conv_channels, kernel - 1)
        conv = torch.nn.functional.pad(conv, (1, 0))
    if module.hybridkv_state_shape is None:  # a short convolution: no recurrent state
        return OneRequestCache(module.layer_idx, kernel, conv, None)
    ssm = fetch("ssm")
    shape = (ssm.shape[0], *module.hybridkv_state_shape)
    # the layout sizes the recurrent state in float32 or in the model's dtype, as the family keeps it
    recurrent = ssm.view(torch.float32 if ssm.numel() == 4 * _numel(shape) else dtype).view(shape)
    return OneRequestCache(module.layer_idx, kernel, conv, recurrent)


def _numel(shape: tuple[int, ...]) -> int:
    return functools.reduce(lambda a, b: a * b, shape, 1)


def _store(cache: OneRequestCache, buffers: dict[str, StateBuffer], put: Put) -> None:
    conv, recurrent = cache.conv_states[0], cache.recurrent_states[0]
    if "conv" in buffers:
        assert conv is not None
        put("conv", conv[..., 1:])
    if "ssm" not in buffers:  # a short convolution
        return
    assert recurrent is not None
    per_row = buffers["ssm"].nbytes
    if recurrent.numel() * recurrent.element_size() != per_row * recurrent.shape[0]:
        import torch

        assert conv is not None  # (lightning keeps its state in the model dtype, as the layout sizes it)
        recurrent = recurrent.to(torch.float32 if per_row * recurrent.shape[0] == 4 * recurrent.numel()
                                 else conv.dtype)
    put("ssm", recurrent)


def _fetch_row(buffers: dict[str, StateBuffer], tables: tuple[Any, ...], row: int, name: str) -> torch.Tensor:
    return buffers[name].gather(tables, row)[None]


def _put_row(buffers: dict[str, StateBuffer], tables: tuple[Any, ...], row: int, name: str,
             data: torch.Tensor) -> None:
    buffers[name].scatter(tables, row, data[0])


def _one_token_each(step: Any, first: Any) -> bool:
    """A decode step for this layer: two or more requests, one token each, every one with a
    state already (none at position 0)."""
    return len(step.runs) > 1 and all(hi - lo == 1 and int(first[lo]) > 0 for _, lo, hi in step.runs)


def recurrent_forward(original: Callable[..., Any], module: Any, buffers: dict[str, StateBuffer],
                      hidden_states: torch.Tensor, cache_params: Any = None, attention_mask: Any = None,
                      past_key_values: Any = None, **kwargs: Any) -> torch.Tensor:
    """The module's forward over its state pages: once for a decode step's whole batch, else
    per request of the packed step."""
    import torch

    from hybridkv.runtime.attention import STEP_KEYWORD, StepContext, step_context

    for handed in (cache_params, past_key_values):
        if isinstance(handed, StepContext):  # handed over by the layer (Jamba, LFM2: ``_pass_step``)
            kwargs[STEP_KEYWORD] = handed
    step = step_context(kwargs, f"layer {module.layer_idx} keeps its state in hybridkv pages")
    # slots and positions from the host copies: no device read per request
    tables = step.host_tables or step.tables
    first = step.host_q_pos if step.host_q_pos is not None else step.q_pos
    if step.decode or _one_token_each(step, first):
        # the batch as batch (one token each, in packed order): slots looked up on the device
        # (a graph's padding rows, kv_len 0, read a spare slot and write back what it holds)
        keep = step.kv_len[step.q_row] == 0 if step.decode else None
        if not step.decode:
            rows = [row for row, _, _ in step.runs]
            for buffer in buffers.values():
                buffer.check_rows(tables, rows)
        cache = _load(module, buffers, lambda n: buffers[n].gather_rows(step.tables, step.q_row),
                      hidden_states.dtype)
        out = _call(original, module, hidden_states.transpose(0, 1), cache)
        _store(cache, buffers, lambda n, data: buffers[n].scatter_rows(step.tables, step.q_row, data, keep))
        return _result(module, out.transpose(0, 1))
    outs = []
    for row, lo, hi in step.runs:
        if int(first[lo]) == 0:  # a fresh request: the module starts from a zero state
            cache = OneRequestCache(module.layer_idx, module.hybridkv_conv_kernel, None, None)
            outs.append(_call(original, module, hidden_states[:, lo:hi], cache))
        else:
            cache = _load(module, buffers, functools.partial(_fetch_row, buffers, tables, row), hidden_states.dtype)
            # Mamba-1's own scan would start from zero: it continues the state (mamba1.py)
            with mamba1.continuing(cache.recurrent_states[0] if module.hybridkv_mamba1 else None):
                outs.append(_call(original, module, hidden_states[:, lo:hi], cache))
        _store(cache, buffers, functools.partial(_put_row, buffers, tables, row))
    return _result(module, torch.cat(outs, dim=1))


def _call(original: Callable[..., Any], module: Any, hidden_states: torch.Tensor, cache: OneRequestCache) -> Any:
    """The module's own forward over ``cache``; its output tensor (lightning attention returns
    it with its state)."""
    if module.hybridkv_lightning:  # (it takes no mask and no rotary, but names them)
        out, _ = original(hidden_states, None, None, past_key_values=cache)
        return out
    return original(hidden_states, **{module.hybridkv_cache_keyword: cache})


def _result(module: Any, out: torch.Tensor) -> Any:
    """What the module's caller expects back: lightning attention's decoder layer unpacks a pair."""
    return (out, None) if module.hybridkv_lightning else out


def _pass_step(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A decoder layer's forward that passes the step on as its ``past_key_values``, which it
    hands to its mixer (Jamba, LFM2: of the call's keywords, the mixer gets that one alone)."""
    from hybridkv.runtime.attention import STEP_KEYWORD

    if STEP_KEYWORD in kwargs:
        kwargs["past_key_values"] = kwargs[STEP_KEYWORD]
    return original(*args, **kwargs)


def _wrap(module: Any, forward: Callable[..., Any], *args: Any) -> None:
    original = getattr(module, "hybridkv_original_forward", None) or module.forward
    module.hybridkv_original_forward = original  # a second engine on the same model wraps the original
    module.forward = functools.partial(forward, original, *args)


def _prepare(module: Any, layer_idx: int, buffers: dict[str, StateBuffer]) -> None:
    """Check a recurrent module and its state buffers; note its sizes and how it is called."""
    shape, channels, short = recurrent_shape(module), _conv_channels(module), _is_short_conv(module)
    lightning = _is_lightning(module)
    if not lightning and ((shape is None and not short) or channels is None
                          or not hasattr(module, "conv_kernel_size")):
        raise ConfigError(f"layer {layer_idx} ({type(module).__name__}): the engine runs gated delta net, "
                          "Mamba-2, Mamba-1, short-convolution and lightning-attention recurrent layers only")
    want = ["ssm"] if lightning else ["conv"] if short else ["conv", "ssm"]
    if sorted(buffers) != want:
        raise ConfigError(f"layer {layer_idx} ({type(module).__name__}): expected state buffers {want}, "
                          f"got {sorted(buffers)}")
    module.hybridkv_state_shape, module.hybridkv_conv_channels = shape, channels
    module.hybridkv_conv_kernel, module.hybridkv_lightning = getattr(module, "conv_kernel_size", 1), lightning
    module.hybridkv_mamba1 = _is_mamba1(module)
    if module.hybridkv_mamba1 and not mamba1.install(module):
        raise ConfigError(f"layer {layer_idx} ({type(module).__name__}): a Mamba-1 mixer whose modeling module has "
                          f"no {mamba1.FUNCTION} to continue a state with")
    module.hybridkv_cache_keyword = "past_key_values" if short else "cache_params"


def install(model: Any, states: dict[int, dict[str, StateBuffer]]) -> None:
    """Route every recurrent layer of ``model`` in ``states`` through its state pages."""
    from_layer = []  # mixers that get the step through their decoder layer's past_key_values
    for module in model.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx not in states or not (hasattr(module, "conv1d") or _is_short_conv(module)
                                           or _is_lightning(module)):
            continue
        _prepare(module, layer_idx, states[layer_idx])
        _wrap(module, recurrent_forward, module, states[layer_idx])
        if _is_mamba1(module) or _is_short_conv(module):
            from_layer.append(module)
        states = {k: v for k, v in states.items() if k != layer_idx}
    if states:
        raise ConfigError(f"recurrent layers {sorted(states)} have pages but no recurrent module in the model")
    for layer in model.modules():
        if any(any(child is m for m in from_layer) for child in layer.children()):
            _wrap(layer, _pass_step)
