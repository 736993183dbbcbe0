"""Ids, units and small enums shared by every layer.

NewType ids keep a slot id, a block ordinal and a request id from being mixed up in
signatures; at run time they are plain ints (and int32/int64 arrays in the hot paths).
"""

from __future__ import annotations

from typing import NewType

SlotId = NewType("SlotId", int)
"""A physical page in one pool group's allocator."""

BlockIndex = NewType("BlockIndex", int)
"""A request's block ordinal: block b covers tokens [b * tpb, (b + 1) * tpb)."""

CacheHandle = NewType("CacheHandle", int)
"""A cache handle: names one request's cache inside the manager (the engine keeps its own
request ids; a request preempted and recomputed gets a new cache handle)."""

LayerGroupId = NewType("LayerGroupId", int)
PoolGroupId = NewType("PoolGroupId", int)


TierId = NewType("TierId", int)
"""Where a page lives: 0 is the GPU, 1..n the lower tiers of ``StorageConfig.lower_tiers`` in
order (a lower value is a faster tier). Ids, not an enum: the tier list is data, and the hot
paths and the prefix index keep tiers in int arrays."""

GPU = TierId(0)

DEFAULT_TIER_NAMES = ("gpu", "host", "disk")
"""The names of the default tier list (the GPU, the host share of the plan, a disk tier): what
KV events call tiers 0, 1, 2 unless told the names of another list."""


KIB = 1024
MIB = 1024**2
GIB = 1024**3
