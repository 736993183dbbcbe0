"""Layer groups and pool groups.

A *layer group* is layers with one life cycle; one of its slots is a block's page in every
one of its layers (so one slot id addresses ``len(layer_ids)`` pages). A *pool group* is the
layer groups whose slot sizes match: they draw slot ids from one allocator and one buffer, so
memory moves freely between, say, gpt-oss's sliding and full layers.

Two modes (``POOL_MODES``). ``per-lifecycle``: one layer group per life cycle, so life cycles
with different slot sizes get pools of their own, each with its own floors and share of the
quota. ``shared``: each life cycle's layers are cut into layer groups of one page size
(layouts/arena.py), so every joined layer group is in one pool group, the *arena*: any layer
group can use any page at any moment. A life cycle that no page size suits (padding >= 5%)
keeps a pool of its own, and the grouping says why. A state life cycle joins as *slices*:
its state cut into page-sized parts, each a layer group (``LayerGroup.state_slice``).

Group ids are assigned in order of first appearance in the layout, so they are stable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hybridkv.core.errors import ConfigError
from hybridkv.core.types import LayerGroupId, PoolGroupId
from hybridkv.layouts.arena import choose_arena
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
    used_bytes: int = 0  # bytes its layers fill of a slot; less than slot_bytes when padded
    state_slice: tuple[int, int] | None = None
    """``(k, n)``: the group holds bytes ``[k * slot_bytes, ...)`` of the state of all its
    layers laid back to back (slice ``k`` of ``n``; shared mode, state life cycles only)."""

    @property
    def padding_bytes(self) -> int:
        return self.slot_bytes - self.used_bytes if self.used_bytes else 0


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
    pools_mode: str = "per-lifecycle"
    page_bytes: int | None = None  # the arena's page (shared mode)
    own_pools: tuple[str, ...] = ()  # shared mode: why a life cycle keeps a pool of its own

    @property
    def padding_bytes(self) -> int:
        """Padding in one block of every layer group (bytes no layer uses)."""
        return sum(lg.padding_bytes for lg in self.layer_groups)

    def life_cycles(self, pool_group: PoolGroupId) -> tuple[LifeCycle, ...]:
        """Life cycles of a pool group's layer groups, in layer-group order."""
        return tuple(self.layer_groups[i].life_cycle
                     for i in self.pool_groups[pool_group].layer_group_ids)


POOL_MODES = ("per-lifecycle", "shared")


def group_layers(layout: ModelLayout, tokens_per_block: int, pools: str = "per-lifecycle") -> GroupedLayout:
    """Cut a layout into layer groups and pool groups (by slot bytes) in mode ``pools``."""
    if tokens_per_block < 1:
        raise ConfigError(f"tokens_per_block must be >= 1, got {tokens_per_block}; "
                          "set --tokens-per-block (16 is a common choice)")
    if pools not in POOL_MODES:
        raise ConfigError(f"pools must be one of {', '.join(POOL_MODES)}, got {pools!r} (--pools)")
    by_lc: dict[LifeCycle, list[int]] = {}
    for i, layer in enumerate(layout.layers):
        by_lc.setdefault(layer.life_cycle, []).append(i)
    page: int | None = None
    notes: tuple[str, ...] = ()
    # (life cycle, layers, slot bytes, used bytes, state slice)
    parts: list[tuple[LifeCycle, tuple[int, ...], int, int, tuple[int, int] | None]] = []
    if pools == "shared":
        choice = choose_arena(layout, tokens_per_block)
        page = choice.page_bytes
        parts = [(p.life_cycle, g, page, used, (k, len(p.groups)) if p.sliced else None)
                 for p in choice.joined for k, (g, used) in enumerate(zip(p.groups, p.used_bytes, strict=True))]
        own = {lc for lc, _ in choice.own_pools}
        notes = tuple(f"{lc.describe()} keeps its own pool: {why}" for lc, why in choice.own_pools)
        by_lc = {lc: ids for lc, ids in by_lc.items() if lc in own}
    for lc, lc_layers in by_lc.items():
        b = _bytes(layout, lc_layers, tokens_per_block)
        parts.append((lc, tuple(lc_layers), b, b, None))
    # layer groups in order of their first layer (a state's slices in slice order)
    parts.sort(key=lambda part: (part[1][0], part[4] or (0, 0)))
    pool_of_bytes: dict[int, PoolGroupId] = {}
    members: dict[PoolGroupId, list[LayerGroupId]] = {}
    layer_groups: list[LayerGroup] = []
    for lg_index, (lc, ids, slot_bytes, used, state_slice) in enumerate(parts):
        lg_id = LayerGroupId(lg_index)
        pg_id = pool_of_bytes.setdefault(slot_bytes, PoolGroupId(len(pool_of_bytes)))
        members.setdefault(pg_id, []).append(lg_id)
        layer_groups.append(LayerGroup(lg_id, lc, ids, slot_bytes, pg_id, used, state_slice))
    pool_groups = tuple(
        PoolGroup(pg_id, tuple(members[pg_id]), slot_bytes)
        for slot_bytes, pg_id in pool_of_bytes.items()
    )
    return GroupedLayout(layout, tokens_per_block, tuple(layer_groups), pool_groups, pools, page, notes)


def _bytes(layout: ModelLayout, ids: Sequence[int], tokens_per_block: int) -> int:
    return sum(layout.layers[i].page_bytes(tokens_per_block) for i in ids)
