"""Ids, units and small enums shared by every layer.

NewType ids keep a slot id, a block ordinal and a request id from being mixed up in
signatures; at run time they are plain ints (and int32/int64 arrays in the hot paths).
"""

from __future__ import annotations

import enum
from typing import NewType

SlotId = NewType("SlotId", int)
"""A physical page in one pool group's allocator."""

BlockIndex = NewType("BlockIndex", int)
"""A request's block ordinal: block b covers tokens [b * tpb, (b + 1) * tpb)."""

RequestId = NewType("RequestId", int)
"""A request cache handle inside the manager."""

LayerGroupId = NewType("LayerGroupId", int)
PoolGroupId = NewType("PoolGroupId", int)


class Tier(enum.IntEnum):
    """Where a page lives. Lower value = faster tier."""

    GPU = 0
    HOST = 1
    DISK = 2


class LifeCycleKind(enum.Enum):
    """How a layer's blocks become stale."""

    ATTENTION = "attention"  # full (window None) or sliding window, optional sink tokens
    CHUNKED = "chunked"  # chunked local attention: tokens see only their own chunk
    SSM = "ssm"  # recurrent state: one constant-size slot per request


KIB = 1024
MIB = 1024**2
GIB = 1024**3
