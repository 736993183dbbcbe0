"""Layer groups and pool groups.

A *layer group* is every layer with one life cycle; one of its slots is a block's page in
every one of its layers (so one slot id addresses ``len(layer_ids)`` pages). A *pool group*
is the layer groups whose slot sizes match: they draw slot ids from one allocator and one
buffer, so memory moves freely between, say, gpt-oss's sliding and full layers.

Group ids are assigned in order of first appearance in the layout, so they are stable.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridkv.core.errors import ConfigError
from hybridkv.core.types import LayerGroupId, PoolGroupId
from hybridkv.layouts.spec import ModelLayout
from hybridkv.lifecycles import LifeCycle


@dataclass(frozen=True, slots=True)
class LayerGroup:
    """Layers that share a life cycle; one slot = one block across all of them."""

    id: LayerGroupId
    life_cycle: LifeCycle
    layer_ids: tuple[int, ...]
    slot_bytes: int
    pool_group: PoolGroupId


@dataclass(frozen=True, slots=True)
class PoolGroup:
    """Layer groups with equal slot bytes, sharing one allocator and one slot id space."""

    id: PoolGroupId
    layer_group_ids: tuple[LayerGroupId, ...]
    slot_bytes: int


@dataclass(frozen=True, slots=True)
class GroupedLayout:
    """A layout cut into layer groups and pool groups at one tokens_per_block."""

    layout: ModelLayout
    tokens_per_block: int
    layer_groups: tuple[LayerGroup, ...]
    pool_groups: tuple[PoolGroup, ...]

    def life_cycles(self, pool_group: PoolGroupId) -> tuple[LifeCycle, ...]:
        """Life cycles of a pool group's layer groups, in layer-group order."""
        return tuple(self.layer_groups[i].life_cycle
                     for i in self.pool_groups[pool_group].layer_group_ids)


def group_layers(layout: ModelLayout, tokens_per_block: int) -> GroupedLayout:
    """Cut a layout into layer groups (by life cycle) and pool groups (by slot bytes)."""
    if tokens_per_block < 1:
        raise ConfigError(f"tokens_per_block must be >= 1, got {tokens_per_block}; "
                          "set --tokens-per-block (16 is a common choice)")
    by_lc: dict[LifeCycle, list[int]] = {}
    for i, layer in enumerate(layout.layers):
        by_lc.setdefault(layer.life_cycle, []).append(i)
    pool_of_bytes: dict[int, PoolGroupId] = {}
    members: dict[PoolGroupId, list[LayerGroupId]] = {}
    layer_groups: list[LayerGroup] = []
    for lg_index, (lc, ids) in enumerate(by_lc.items()):
        lg_id = LayerGroupId(lg_index)
        slot_bytes = sum(layout.layers[i].page_bytes(tokens_per_block) for i in ids)
        pg_id = pool_of_bytes.setdefault(slot_bytes, PoolGroupId(len(pool_of_bytes)))
        members.setdefault(pg_id, []).append(lg_id)
        layer_groups.append(LayerGroup(lg_id, lc, tuple(ids), slot_bytes, pg_id))
    pool_groups = tuple(
        PoolGroup(pg_id, tuple(members[pg_id]), slot_bytes)
        for slot_bytes, pg_id in pool_of_bytes.items()
    )
    return GroupedLayout(layout, tokens_per_block, tuple(layer_groups), pool_groups)
