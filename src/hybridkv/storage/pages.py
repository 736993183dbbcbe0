"""Where each page lives inside a pool buffer.

A pool group's buffer is one allocation of ``num_slots x slot_bytes`` bytes, slot-major. A
slot owned by layer group ``g`` holds one page per (layer, buffer) of ``g``, back to back in
layer order, K before V::

    slot s:  | layer a: K page | layer a: V page | layer b: K page | ... |   (slot_bytes)
    address(layer, buffer, slot) = base + offset(layer, buffer) + slot * slot_bytes

so a kernel reads layer ``a``'s K pages as a strided view: base + offset, stride
``slot_bytes``, each page ``tokens_per_block x bytes_per_token`` bytes (token-major; an SSM
page is one state). Moving a slot between tiers is one contiguous copy of ``slot_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridkv.core.types import LayerGroupId, PoolGroupId
from hybridkv.layouts.grouping import GroupedLayout


@dataclass(frozen=True, slots=True)
class PageSpec:
    """One (layer, buffer) page inside a slot of its layer group's pool group."""

    layer_id: int
    buffer: str
    offset: int  # bytes from the start of the slot
    page_bytes: int
    bytes_per_token: int  # 0 for an SSM state page
    stride: int  # = slot_bytes of the pool group


def page_specs(grouped: GroupedLayout, layer_group: LayerGroupId) -> tuple[PageSpec, ...]:
    """The pages one slot of ``layer_group`` holds, in address order."""
    lg = grouped.layer_groups[layer_group]
    tpb, offset, out = grouped.tokens_per_block, 0, []
    for layer_id in lg.layer_ids:
        for buf in grouped.layout.layers[layer_id].buffers:
            size = buf.page_bytes(tpb)
            out.append(PageSpec(layer_id, buf.name, offset, size, buf.bytes_per_token, lg.slot_bytes))
            offset += size
    return tuple(out)


def pool_page_specs(grouped: GroupedLayout, pool_group: PoolGroupId) -> dict[LayerGroupId, tuple[PageSpec, ...]]:
    return {i: page_specs(grouped, i) for i in grouped.pool_groups[pool_group].layer_group_ids}
