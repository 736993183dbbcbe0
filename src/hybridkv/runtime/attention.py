"""The seam into transformers: an attention function registered under ``"hybridkv"``.

transformers' attention modules compute q, k and v (with RoPE, norms, NoPE layers as the
model defines them), then call the registered function of ``config._attn_implementation``
with the module, ``[1, H, T, D]`` tensors and the keyword arguments the model's forward was
given. The engine passes its ``StepContext`` as the keyword ``hybridkv_step``; the function
writes the layer's new keys and values into its pages and runs paged attention over them
with the layer's life cycle (window, sink tokens, chunk) from the hybridkv layout, the
module's softcap (Gemma 2) and learned sinks (GPT-OSS). The mask function registered under
the same name returns None, so transformers builds no dense mask: the life cycle is the mask.

The packed sequence is one batch row holding every request's tokens; ``position_ids`` give
each token its request's position, which is all RoPE needs. One family computes a factor
from the token index instead (Llama 4's NoPE temperature tuning, from ``arange(T)``); the
function corrects it to the token's real position.

A shared attention block (Zamba2: one module, ``layer_idx`` -1, run by several hybrid layers)
learns its layer only as a forward argument, which transformers does not hand to the
attention function; ``install_shared`` wraps such a module's forward so the call's layer
travels in the keyword ``hybridkv_layer_idx``, which the function prefers to the module's.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hybridkv.core.errors import UsageError
from hybridkv.engine.paged_attention import paged_attention, write_kv
from hybridkv.engine.triton_write import WriteKV
from hybridkv.runtime.pages import LayerPages

if TYPE_CHECKING:
    import torch

ATTENTION_NAME = "hybridkv"
STEP_KEYWORD = "hybridkv_step"
LAYER_KEYWORD = "hybridkv_layer_idx"  # a shared block's layer for this call (install_shared)
PagedAttention = Callable[..., "torch.Tensor"]  # the signature of engine.paged_attention.paged_attention


@dataclass(frozen=True, slots=True)
class StepContext:
    """What every layer of one step reads: the packed tokens' rows and positions, the tokens
    each row sees, the block table of every layer group (``[rows, blocks]``) and the pages."""

    q_row: torch.Tensor  # [T] int64: the batch row of each packed token
    q_pos: torch.Tensor  # [T] int64: its absolute position in its request
    kv_len: torch.Tensor  # [R] int64: tokens each row sees after this step's writes
    tables: tuple[torch.Tensor, ...]  # per layer group: [R, W] int32 slots, -1 where released
    layers: dict[int, LayerPages]  # attention layer id -> its pages and life cycle
    runs: tuple[tuple[int, int, int], ...]  # (row, first, end) of each request's packed tokens
    kernel: PagedAttention = paged_attention
    write: WriteKV = write_kv  # writes the step's keys / values into the pages (engine.triton_write)
    # the same on the host (NumPy), for per-request work that would otherwise read the device
    # one number at a time (state slots, a run's first position)
    host_tables: tuple[Any, ...] = ()
    host_q_pos: Any = None
    # a decode graph's static step: every token its row's only one, every row with a state
    # (recurrent layers take the batch at once); rows whose kv_len is 0 are padding
    decode: bool = False


def _temperature_fix(module: Any, q: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """Llama 4 scales NoPE queries by ``log1p(floor((i + 1) / floor_scale)) * attn_scale + 1``
    with ``i`` the token's index in the forward call; packed, ``i`` must be its position."""
    import torch

    if not getattr(module, "attn_temperature_tuning", False) or getattr(module, "use_rope", True):
        return q

    def scales(i: torch.Tensor) -> torch.Tensor:
        return torch.log1p(torch.floor((i.float() + 1.0) / module.floor_scale)) * module.attn_scale + 1.0

    index = torch.arange(q.shape[0], device=q.device)
    return (q.float() * (scales(q_pos) / scales(index))[:, None, None]).to(q.dtype)


def step_context(kwargs: dict[str, Any], who: str, batch: int | None = None) -> StepContext:
    """The step a forward call over hybridkv's pages runs in (the engine passes it as the
    ``hybridkv_step`` keyword), checking the packed batch of 1; ``who`` names the caller."""
    step = kwargs.get(STEP_KEYWORD)
    if not isinstance(step, StepContext):
        raise UsageError(f"{who}: run the model through hybridkv.runtime.engine.Engine (the forward call "
                         f"needs {STEP_KEYWORD}=StepContext)")
    if batch is not None and batch != 1:
        raise UsageError(f"{who} takes one packed sequence (batch 1), got batch {batch}")
    return step


def hybridkv_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``[1, H, T, D]`` in, ``[1, T, Hq, Dv]`` out."""
    step = step_context(kwargs, f"attention {ATTENTION_NAME!r} reads hybridkv pages", query.shape[0])
    layer_idx = kwargs.get(LAYER_KEYWORD, module.layer_idx)
    layer = step.layers.get(layer_idx)
    if layer is None:
        raise UsageError(f"attention {ATTENTION_NAME!r}: layer {layer_idx} ({type(module).__name__}) has no pages; "
                         f"the engine pages layers {sorted(step.layers)}")
    table = step.tables[layer.layer_group]
    q = _temperature_fix(module, query[0].transpose(0, 1), step.q_pos)
    step.write(layer.k, layer.v, table, step.q_row, step.q_pos, key[0].transpose(0, 1), value[0].transpose(0, 1))
    scale = kwargs.get("scaling")
    sinks = kwargs.get("s_aux", getattr(module, "sinks", None))
    out = step.kernel(q, layer.k, layer.v, table, step.q_row, step.q_pos, step.kv_len,
                      scale=float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1]),
                      window=layer.window, sink_tokens=layer.sink_tokens, chunk=layer.chunk,
                      softcap=kwargs.get("softcap"), sinks=sinks)
    return out[None], None


def _shared_forward(original: Callable[..., Any], hidden_states: Any, layer_idx: int, *args: Any,
                    **kwargs: Any) -> Any:
    return original(hidden_states, layer_idx, *args, **{LAYER_KEYWORD: layer_idx, **kwargs})


def install_shared(model: Any) -> int:
    """Wrap the forward of every shared attention block of ``model`` (its ``layer_idx`` not a
    layer, its forward taking one) so that the call's layer reaches the attention function;
    the number of blocks wrapped."""
    wrapped = 0
    for module in model.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if not isinstance(layer_idx, int) or layer_idx >= 0:
            continue
        original = getattr(module, "hybridkv_original_forward", None) or module.forward
        if "layer_idx" not in inspect.signature(original).parameters:
            continue
        module.hybridkv_original_forward = original  # a second engine on the same model wraps the original
        module.forward = functools.partial(_shared_forward, original)
        wrapped += 1
    return wrapped


def no_dense_mask(*args: Any, **kwargs: Any) -> None:
    """The mask function of ``"hybridkv"``: none (the life cycle is the mask)."""
    return None


def register() -> None:
    """Register the attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, hybridkv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, no_dense_mask)
