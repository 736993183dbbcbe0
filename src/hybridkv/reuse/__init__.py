"""Prefix reuse, storage-agnostic: block keys, the prefix index with the hybrid-aware longest
match, and KV events for cache-aware routers.

Modules bottom-up (imports point down): ``keys`` (chained block digests), ``events`` (what
changed, for routers), ``match`` (which blocks a layer group needs at a history; pure),
``entries`` (structure of arrays), ``eviction`` (order of unused entries), ``index``
(PrefixIndex). The manager owns slots; the index only records them.
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
from hybridkv.reuse.index import InsertResult, Locations, Match, MatchedBlocks, PrefixIndex
from hybridkv.reuse.keys import KEY_BYTES, MultimodalItem, ReuseScope, block_keys
from hybridkv.reuse.match import longest_match, needed_blocks

__all__ = [
    "KEY_BYTES",
    "AllCleared",
    "BlockRemoved",
    "BlockStored",
    "BlockUpdated",
    "CachedEntry",
    "EntryRef",
    "EventBatch",
    "EventQueue",
    "InsertResult",
    "KVEvent",
    "Locations",
    "Match",
    "MatchedBlocks",
    "MultimodalItem",
    "PrefixIndex",
    "ReuseScope",
    "block_keys",
    "longest_match",
    "needed_blocks",
]
