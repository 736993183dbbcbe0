"""Life cycles: which of a request's blocks are live and which are stale, one kind per file.

``base.LifeCycle`` is the contract (every question the planner, manager, prefix cache and
engine ask about a layer's blocks); the kinds are ``Full``, ``Sliding`` (window + sinks),
``Chunked``, ``Ssm`` and ``Encoder``, each registered against its layout JSON ``type``.
Importing this package registers them all.
"""

from __future__ import annotations

import numpy.typing as npt

from hybridkv.lifecycles import attention as _attention  # registers the "attention" layout type
from hybridkv.lifecycles.base import (
    LAYER_TYPES,
    BlockRange,
    ForkPages,
    IntArray,
    LayerType,
    LifeCycle,
    MatchSearch,
    Positions,
    register_layer_type,
)
from hybridkv.lifecycles.chunked import Chunked
from hybridkv.lifecycles.encoder import Encoder
from hybridkv.lifecycles.full import Full
from hybridkv.lifecycles.sliding import Sliding
from hybridkv.lifecycles.ssm import Ssm
from hybridkv.lifecycles.worst import MAX_DECODE_POSITIONS, decode_positions, worst_decode_blocks

del _attention


def live_blocks(lc: LifeCycle, capacity: npt.ArrayLike, history: npt.ArrayLike, tokens_per_block: int) -> IntArray:
    """Slots one request of (capacity, history) needs in a layer group of life cycle ``lc``."""
    return lc.live_blocks(capacity, history, tokens_per_block)


def stale_range(lc: LifeCycle, history: int, tokens_per_block: int) -> BlockRange:
    """Blocks no query at a position >= ``history`` will attend to."""
    return lc.stale_range(history, tokens_per_block)


__all__ = [
    "LAYER_TYPES", "MAX_DECODE_POSITIONS",
    "BlockRange", "Chunked", "Encoder", "ForkPages", "Full", "IntArray", "LayerType", "LifeCycle", "MatchSearch",
    "Positions", "Sliding", "Ssm",
    "decode_positions", "live_blocks", "register_layer_type", "stale_range", "worst_decode_blocks",
]
