"""Prefix reuse, storage-agnostic: block keys, the prefix index with the hybrid-aware longest
match, and KV events for cache-aware routers.

Data flow (imports point down): ``keys`` (chained block digests) -> ``events`` (what changed)
-> ``match`` (which blocks a layer group needs at a history; pure) -> ``entries`` (structure
of arrays) -> ``index`` (PrefixIndex). The manager owns slots; the index only records them.
"""

from hybridkv.reuse.entries import CachedEntry, EntryRef
from hybridkv.reuse.events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    BlockUpdated,
    EventBatch,
    EventQueue,
    KVEvent,
)
from hybridkv.reuse.index import InsertResult, Match, MatchedBlocks, PrefixIndex
from hybridkv.reuse.keys import BlockKey, MultimodalItem, ReuseScope, block_keys
from hybridkv.reuse.match import longest_match, needed_blocks

__all__ = [
    "AllCleared",
    "BlockKey",
    "BlockRemoved",
    "BlockStored",
    "BlockUpdated",
    "CachedEntry",
    "EntryRef",
    "EventBatch",
    "EventQueue",
    "InsertResult",
    "KVEvent",
    "Match",
    "MatchedBlocks",
    "MultimodalItem",
    "PrefixIndex",
    "ReuseScope",
    "block_keys",
    "longest_match",
    "needed_blocks",
]
