"""Where each page lives inside a pool buffer.

A pool group's buffer is one allocation of ``num_slots x slot_bytes`` bytes, slot-major. A
slot owned by layer group ``g`` holds one page per (layer, buffer) of ``g``, back to back in
layer order, K before V::

    slot s:  | layer a: K page | layer a: V page | layer b: K page | ... |   (slot_bytes)
    address(layer, buffer, slot) = base + offset(layer, buffer) + slot * slot_bytes

so a kernel reads layer ``a``'s K pages as a strided view: base + offset, stride
``slot_bytes``, each page ``tokens_per_block x bytes_per_token`` bytes (token-major; an SSM
page is one state). Moving a slot between tiers is one contiguous copy of ``slot_bytes``.

A *state slice* group (shared mode) holds one page-sized part of the states of all its layers
laid back to back; its specs are the parts of (layer, buffer) states that fall in the slice,
each with ``start``, its first byte within that state. An engine reads a layer's state by
gathering its parts from the slice groups' slots of the request, in slice order.
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
    start: int = 0  # first byte of the (layer, buffer) page this spec holds (state slices)


def page_specs(grouped: GroupedLayout, layer_group: LayerGroupId) -> tuple[PageSpec, ...]:
    """The pages one slot of ``layer_group`` holds, in address order."""
    lg = grouped.layer_groups[layer_group]
    tpb, offset, out = grouped.tokens_per_block, 0, []
    lo, hi = 0, None  # the byte range of the back-to-back pages this group holds
    if lg.state_slice is not None:
        lo = lg.state_slice[0] * lg.slot_bytes
        hi = lo + lg.slot_bytes
    for layer_id in lg.layer_ids:
        for buf in grouped.layout.layers[layer_id].buffers:
            size = buf.page_bytes(tpb)
            a, b = max(offset, lo), offset + size if hi is None else min(offset + size, hi)
            if a < b:
                out.append(PageSpec(layer_id, buf.name, a - lo, b - a, buf.bytes_per_token, lg.slot_bytes, a - offset))
            offset += size
    return tuple(out)


def pool_page_specs(grouped: GroupedLayout, pool_group: PoolGroupId) -> dict[LayerGroupId, tuple[PageSpec, ...]]:
    return {i: page_specs(grouped, i) for i in grouped.pool_groups[pool_group].layer_group_ids}
