"""Each attention layer's pages as tensors: strided views into its pool group's buffer.

A slot of layer group ``g`` holds one page per (layer, buffer) at ``PageSpec.offset``
(``storage/pages.py``). Viewed in the model's dtype, layer ``a``'s K pages are::

    buffer [num_slots, slot_bytes] uint8  ->  [:, offset : offset + page_bytes]  ->  [num_slots, tpb, Hkv, D]

a view with stride ``slot_bytes`` between slots, so writing ``k[slot, offset_in_block]`` writes
the manager's buffer in place, and every page move the manager makes (suspend, resume, fork
copies, prefix-cache copies) is seen by the next step without any copy here. An MLA layer's
one ``latent`` page holds a single head ``[c_kv ; k_pe]`` per token: it is both the K and the
V view, and the MLA path reads V as its first ``kv_lora_rank`` channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hybridkv.core.errors import ConfigError
from hybridkv.core.types import GPU, LayerGroupId
from hybridkv.manager.manager import KVCacheManager
from hybridkv.storage.pages import PageSpec, page_specs

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class LayerPages:
    """One attention layer's page views and the life cycle its mask follows."""

    layer_id: int
    layer_group: int
    k: torch.Tensor  # [num_slots, tokens_per_block, kv_heads, head_dim] (MLA: 1 head, rank + rope)
    v: torch.Tensor  # [num_slots, tokens_per_block, kv_heads, v_head_dim] (MLA: k itself; V is its first rank channels)
    window: int | None
    sink_tokens: int
    chunk: int | None


def buffer_tensor(manager: KVCacheManager, pool_group: int) -> torch.Tensor:
    buf: Any = manager.tiers.buffers[GPU][pool_group]
    tensor = getattr(buf, "tensor", None)
    if tensor is None:
        raise ConfigError(f"the reference engine reads pages as torch tensors, but pool group {pool_group} is on "
                          f"{getattr(buf, 'kind', 'no buffer')}: use StorageConfig.local(gpu_backend='torch', ...)")
    return tensor


def _view(tensor: torch.Tensor, spec: PageSpec, tpb: int, heads: int, dtype: torch.dtype) -> torch.Tensor:
    elem = tensor.new_empty(0, dtype=dtype).element_size()
    if spec.page_bytes != spec.bytes_per_token * tpb or spec.start or spec.offset % elem or spec.stride % elem:
        raise ConfigError(f"layer {spec.layer_id} buffer {spec.buffer!r}: page at byte {spec.offset} of "
                          f"{spec.page_bytes} B is not a whole {dtype} page (tokens_per_block {tpb})")
    per_token = spec.bytes_per_token // elem
    if per_token % heads:
        raise ConfigError(f"layer {spec.layer_id}: {per_token} elements per token do not split into {heads} heads")
    typed = tensor.view(dtype)  # [num_slots, slot_bytes / elem], stride slot_bytes / elem
    start = spec.offset // elem
    return typed[:, start:start + tpb * per_token].unflatten(1, (tpb, heads, per_token // heads))


def layer_pages(manager: KVCacheManager, kv_heads: dict[int, int], dtype: torch.dtype) -> dict[int, LayerPages]:
    """Page views of every attention layer in ``kv_heads`` (layer id -> KV heads), by layer id."""
    grouped, tpb = manager.grouped, manager.tokens_per_block
    out: dict[int, LayerPages] = {}
    for lg in grouped.layer_groups:
        specs = {(s.layer_id, s.buffer): s for s in page_specs(grouped, LayerGroupId(lg.id))}
        tensor = buffer_tensor(manager, lg.pool_group)
        lc = lg.life_cycle
        for layer_id in lg.layer_ids:
            if layer_id not in kv_heads:
                continue
            if (layer_id, "latent") in specs:  # MLA: one latent head, K and V alike
                k = _view(tensor, specs[layer_id, "latent"], tpb, 1, dtype)
                out[layer_id] = LayerPages(layer_id, lg.id, k, k, lc.window_tokens, lc.sink_tokens, lc.chunk_tokens)
                continue
            if (layer_id, "k") not in specs or (layer_id, "v") not in specs:
                raise ConfigError(f"layer {layer_id}: the engine needs separate 'k' and 'v' pages "
                                  f"({lc.describe()} has {sorted(b for i, b in specs if i == layer_id)})")
            k = _view(tensor, specs[layer_id, "k"], tpb, kv_heads[layer_id], dtype)
            v = _view(tensor, specs[layer_id, "v"], tpb, kv_heads[layer_id], dtype)
            out[layer_id] = LayerPages(layer_id, lg.id, k, v, lc.window_tokens, lc.sink_tokens, lc.chunk_tokens)
    missing = sorted(set(kv_heads) - set(out))
    if missing:
        raise ConfigError(f"attention layers {missing} have no pages in the plan's layout")
    return out
