"""KV events: what the index emits, the bounded queue, and the JSON form."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DISK, HOST
from hybridkv.core.errors import ConfigError, UsageError
from hybridkv.core.types import GPU, LayerGroupId
from hybridkv.lifecycles import Full
from hybridkv.reuse import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    BlockUpdated,
    EntryRef,
    EventBatch,
    EventQueue,
    PrefixIndex,
    ReuseScope,
    block_keys,
)

SCOPE = ReuseScope(lora_id=2)
ROOT = SCOPE.root()
TPB = 2
TOKENS = np.arange(100, 112)  # 6 blocks
KEYS = block_keys(TOKENS, TPB, SCOPE)
ROWS = TOKENS.reshape(-1, TPB)


def test_index_emits_one_event_per_run() -> None:
    q = EventQueue(100)
    idx = PrefixIndex(q)
    ords = np.array([0, 1, 4, 5])  # sinks + window: two runs
    idx.insert(KEYS, ords, 1, [7, 8, 9, 10], GPU, root=ROOT, block_tokens=ROWS[ords])
    idx.insert(KEYS, [1, 2], 1, [0, 0], GPU, root=ROOT, block_tokens=ROWS[[1, 2]])  # only block 2 is new
    batch = q.drain()
    g = LayerGroupId(1)
    assert batch == EventBatch(0, (
        BlockStored(ROOT, (KEYS[0], KEYS[1]), ((100, 101), (102, 103)), GPU, g),
        BlockStored(KEYS[3], (KEYS[4], KEYS[5]), ((108, 109), (110, 111)), GPU, g),
        BlockStored(KEYS[1], (KEYS[2],), ((104, 105),), GPU, g),
    ), 0)
    idx.move([EntryRef(KEYS[5], g), EntryRef(KEYS[4], g)], HOST, [3, 4])
    idx.remove([EntryRef(KEYS[0], g), EntryRef(KEYS[5], g), EntryRef(KEYS[1], g)])
    idx.clear()
    assert q.drain() == EventBatch(1, (
        BlockUpdated((KEYS[5], KEYS[4]), HOST, 0, g),
        BlockRemoved((KEYS[0], KEYS[1]), GPU, g),  # one event per (layer group, tier)
        BlockRemoved((KEYS[5],), HOST, g),
        AllCleared(),
    ), 0)
    assert q.drain() == EventBatch(2, (), 0)


def test_acquire_release_touch_and_probe_emit_nothing() -> None:
    q = EventQueue(10)
    idx = PrefixIndex(q)
    idx.insert(KEYS, [0, 1], 0, [0, 1], GPU, root=ROOT, block_tokens=ROWS[:2])
    q.drain()
    idx.acquire(KEYS, [0, 1], 0)
    idx.release(KEYS, [0], 0)
    idx.touch(KEYS)
    idx.probe(KEYS, [Full()], TPB)
    assert len(q) == 0


def test_events_need_block_tokens() -> None:
    idx = PrefixIndex(EventQueue(4))
    with pytest.raises(UsageError, match="block_tokens"):
        idx.insert(KEYS, [0, 1], 0, [0, 1], GPU, root=ROOT)
    with pytest.raises(UsageError, match="block_tokens"):
        idx.insert(KEYS, [0, 1], 0, [0, 1], GPU, root=ROOT, block_tokens=ROWS[:1])
    assert len(idx) == 0
    PrefixIndex().insert(KEYS, [0, 1], 0, [0, 1], GPU, root=ROOT)  # no queue: not needed


def test_bounded_queue_drops_oldest_and_counts() -> None:
    q = EventQueue(3)
    for i in range(5):
        q.put(BlockRemoved((bytes([i]),), GPU, LayerGroupId(0)))
    assert len(q) == 3 and q.dropped_total == 2
    batch = q.drain()
    assert batch.dropped == 2 and [e.keys for e in batch.events] == [(b"\x02",), (b"\x03",), (b"\x04",)]  # type: ignore[union-attr]
    q.put(AllCleared())
    assert q.drain() == EventBatch(1, (AllCleared(),), 0)
    assert q.dropped_total == 2
    with pytest.raises(ConfigError, match="max_events"):
        EventQueue(0)


def test_json_shape_and_round_trip() -> None:
    g = LayerGroupId(3)
    events = (
        BlockStored(ROOT, (KEYS[0], KEYS[1]), ((100, 101), (102, 103)), GPU, g),
        BlockRemoved((KEYS[0],), HOST, g),
        BlockUpdated((KEYS[1],), DISK, 7, g),
        AllCleared(),
    )
    batch = EventBatch(12, events, 4)
    text = batch.to_json()
    assert json.loads(text) == {"step": 12, "dropped": 4, "events": [
        {"type": "stored", "parent_key": ROOT.hex(), "keys": [KEYS[0].hex(), KEYS[1].hex()],
         "token_ids": [[100, 101], [102, 103]], "tier": "gpu", "layer_group": 3},
        {"type": "removed", "keys": [KEYS[0].hex()], "tier": "host", "layer_group": 3},
        {"type": "updated", "keys": [KEYS[1].hex()], "tier": "disk", "priority": 7, "layer_group": 3},
        {"type": "cleared"},
    ]}
    assert EventBatch.from_json(text) == batch
    with pytest.raises(UsageError, match="unknown KV event"):
        EventBatch.from_json('{"step": 0, "dropped": 0, "events": [{"type": "nope"}]}')


def test_index_events_survive_json() -> None:
    q = EventQueue(16)
    idx = PrefixIndex(q)
    idx.insert(KEYS, np.arange(6), 0, np.arange(6), GPU, root=ROOT, block_tokens=ROWS)
    idx.move([EntryRef(KEYS[5], LayerGroupId(0))], DISK, [0])
    batch = q.drain()
    assert EventBatch.from_json(batch.to_json()) == batch
