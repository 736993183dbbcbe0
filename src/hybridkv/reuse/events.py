"""KV events: what a cache-aware router needs to mirror which prefixes this cache holds.

The index emits one event per contiguous run of blocks it stores, removes or moves; the
engine drains the queue once per step and publishes the batch. The queue is bounded: when a
consumer falls behind, the oldest events are dropped and counted, and the batch says how
many were lost since the last drain, so the router knows its mirror is stale and resyncs.

JSON form of one batch (``EventBatch.to_json``; keys are lowercase hex, tiers by name: the
manager's ``tiers.names``, by default ``DEFAULT_TIER_NAMES``)::

    {"step": 7, "dropped": 0, "events": [
      {"type": "stored", "parent_key": "9f2c...", "keys": ["a1b2...", "c3d4..."],
       "token_ids": [[1, 2, ...], [17, 18, ...]], "tier": "gpu", "layer_group": 0},
      {"type": "removed", "keys": ["a1b2..."], "tier": "host", "layer_group": 1},
      {"type": "updated", "keys": ["c3d4..."], "tier": "host", "priority": 0, "layer_group": 0},
      {"type": "cleared"}]}

``parent_key`` of a run that starts at block 0 is the scope root (``ReuseScope.root()``).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hybridkv.core.errors import ConfigError, UsageError
from hybridkv.core.types import DEFAULT_TIER_NAMES, LayerGroupId, TierId


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks ``keys`` (a chain: each the child of the one before, the first the child of
    ``parent_key``) are now cached on ``tier`` for ``layer_group``."""

    parent_key: bytes
    keys: tuple[bytes, ...]
    token_ids: tuple[tuple[int, ...], ...]
    tier: TierId
    layer_group: LayerGroupId


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks ``keys`` of ``layer_group`` are no longer cached on ``tier``."""

    keys: tuple[bytes, ...]
    tier: TierId
    layer_group: LayerGroupId


@dataclass(frozen=True, slots=True)
class BlockUpdated:
    """Blocks ``keys`` of ``layer_group`` are still cached, now on ``tier`` with ``priority``."""

    keys: tuple[bytes, ...]
    tier: TierId
    priority: int
    layer_group: LayerGroupId


@dataclass(frozen=True, slots=True)
class AllCleared:
    """Everything was removed (e.g. new weights): the router drops its whole mirror."""


KVEvent = BlockStored | BlockRemoved | BlockUpdated | AllCleared


def _hex(keys: tuple[bytes, ...]) -> list[str]:
    return [k.hex() for k in keys]


def _unhex(keys: list[str]) -> tuple[bytes, ...]:
    return tuple(bytes.fromhex(k) for k in keys)


def event_to_dict(ev: KVEvent, tier_names: Sequence[str] = DEFAULT_TIER_NAMES) -> dict[str, Any]:
    """The JSON-ready form of one event (see the module docstring); tier ids by name."""
    if isinstance(ev, BlockStored):
        return {"type": "stored", "parent_key": ev.parent_key.hex(), "keys": _hex(ev.keys),
                "token_ids": [list(t) for t in ev.token_ids], "tier": tier_names[ev.tier],
                "layer_group": int(ev.layer_group)}
    if isinstance(ev, BlockRemoved):
        return {"type": "removed", "keys": _hex(ev.keys), "tier": tier_names[ev.tier],
                "layer_group": int(ev.layer_group)}
    if isinstance(ev, BlockUpdated):
        return {"type": "updated", "keys": _hex(ev.keys), "tier": tier_names[ev.tier],
                "priority": ev.priority, "layer_group": int(ev.layer_group)}
    return {"type": "cleared"}


def event_from_dict(d: dict[str, Any], tier_names: Sequence[str] = DEFAULT_TIER_NAMES) -> KVEvent:
    """Inverse of ``event_to_dict``; UsageError on an unknown type or tier name."""
    kind = d.get("type")
    if kind == "cleared":
        return AllCleared()
    if kind not in ("stored", "removed", "updated"):
        raise UsageError(f"unknown KV event type {kind!r}")
    if d["tier"] not in tier_names:
        raise UsageError(f"KV event on unknown tier {d['tier']!r}; tiers: {', '.join(tier_names)}")
    keys, group = _unhex(d["keys"]), LayerGroupId(int(d["layer_group"]))
    tier = TierId(list(tier_names).index(d["tier"]))
    if kind == "stored":
        tokens = tuple(tuple(int(t) for t in block) for block in d["token_ids"])
        return BlockStored(bytes.fromhex(d["parent_key"]), keys, tokens, tier, group)
    if kind == "removed":
        return BlockRemoved(keys, tier, group)
    return BlockUpdated(keys, tier, int(d["priority"]), group)


@dataclass(frozen=True, slots=True)
class EventBatch:
    """The events of one step, in emission order, and how many were dropped before them
    (since the previous drain) because the queue was full."""

    step: int
    events: tuple[KVEvent, ...]
    dropped: int = 0

    def to_json(self, tier_names: Sequence[str] = DEFAULT_TIER_NAMES) -> str:
        """``tier_names``: the manager's (``m.tiers.names``) when its tier list is not the default."""
        return json.dumps({"step": self.step, "dropped": self.dropped,
                           "events": [event_to_dict(e, tier_names) for e in self.events]}, separators=(",", ":"))

    @staticmethod
    def from_json(text: str, tier_names: Sequence[str] = DEFAULT_TIER_NAMES) -> EventBatch:
        d = json.loads(text)
        return EventBatch(int(d["step"]), tuple(event_from_dict(e, tier_names) for e in d["events"]),
                          int(d["dropped"]))


class EventQueue:
    """Bounded FIFO of KV events, drained once per step. Full: the oldest event is dropped
    and counted (a slow consumer loses history, the producer never blocks or grows)."""

    def __init__(self, max_events: int) -> None:
        if max_events < 1:
            raise ConfigError(f"max_events must be >= 1, got {max_events}")
        self.max_events = max_events
        self._events: deque[KVEvent] = deque()
        self._step = 0
        self._dropped_since_drain = 0
        self.dropped_total = 0
        """Events dropped over the queue's lifetime."""

    def __len__(self) -> int:
        return len(self._events)

    def put(self, event: KVEvent) -> None:
        if len(self._events) == self.max_events:
            self._events.popleft()
            self._dropped_since_drain += 1
            self.dropped_total += 1
        self._events.append(event)

    def drain(self) -> EventBatch:
        """Everything queued since the last drain, as this step's batch; the step counter
        advances even when the batch is empty, so step numbers match engine steps."""
        batch = EventBatch(self._step, tuple(self._events), self._dropped_since_drain)
        self._events.clear()
        self._step += 1
        self._dropped_since_drain = 0
        return batch
