"""The prefix index's entries, kept as a structure of arrays.

An *entry* is one cached block for one layer group: (key, parent key, ordinal, layer group)
-> (slot, tier, refcount, priority, last_used). Numbers live in parallel NumPy arrays indexed
by row so eviction ordering and bulk updates are vectorized; a dict per layer group maps a key
to its row, so lookups during a probe are O(1). Freed rows are recycled through a free list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from hybridkv.core.types import BlockIndex, LayerGroupId, SlotId, TierId

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class EntryRef:
    """Names one cached entry: a block key within one layer group."""

    key: bytes
    layer_group: LayerGroupId


class CachedEntry(NamedTuple):
    """A snapshot of one entry, taken when it was returned (later changes do not show).
    A NamedTuple rather than a frozen dataclass: ``evictable`` builds many, 4x faster.

    ``refcount`` counts live requests using it; ``priority``: higher is kept longer;
    ``last_used``: the index's logical clock at the last insert / acquire / release / touch."""

    key: bytes
    layer_group: LayerGroupId
    parent: bytes
    ordinal: BlockIndex
    slot: SlotId
    tier: TierId
    refcount: int
    priority: int
    last_used: int
    dead: bool = False  # no match can use it now (``reuse.dead``): evicted before live entries

    @property
    def ref(self) -> EntryRef:
        return EntryRef(self.key, self.layer_group)


class EntryTable:
    """Rows of entries in parallel arrays. Rows of removed entries are not live and are
    reused by later inserts; ``by_group[g][key]`` is the row of a live entry."""

    _ARRAYS = ("ordinal", "group", "slot", "tier", "refcount", "priority", "last_used", "dead")

    def __init__(self, capacity: int = 256) -> None:
        self.keys: list[bytes] = [b""] * capacity
        self.parents: list[bytes] = [b""] * capacity
        self.ordinal = np.zeros(capacity, np.int64)
        self.group = np.zeros(capacity, np.int64)
        self.slot = np.zeros(capacity, np.int64)
        self.tier = np.zeros(capacity, np.int64)
        self.refcount = np.zeros(capacity, np.int64)
        self.priority = np.zeros(capacity, np.int64)
        self.last_used = np.zeros(capacity, np.int64)
        self.dead = np.zeros(capacity, np.int64)  # 1: can serve no match now (evicted first)
        self.live = np.zeros(capacity, np.bool_)
        self.free: list[int] = list(range(capacity - 1, -1, -1))
        self.by_group: dict[LayerGroupId, dict[bytes, int]] = {}

    def __len__(self) -> int:
        return sum(len(d) for d in self.by_group.values())

    def _grow(self, need: int) -> None:
        old = self.live.shape[0]
        new = max(2 * old, old + need)
        for name in (*self._ARRAYS, "live"):
            arr = getattr(self, name)
            grown = np.zeros(new, arr.dtype)
            grown[:old] = arr
            setattr(self, name, grown)
        self.keys.extend([b""] * (new - old))
        self.parents.extend([b""] * (new - old))
        self.free[:0] = range(new - 1, old - 1, -1)  # keep low rows first out

    def add(self, keys: Sequence[bytes], parents: Sequence[bytes], ordinals: I64, group: LayerGroupId,
            slots: I64, tier: TierId, priority: int, clock: int) -> I64:
        """New live rows for entries not yet present (the caller checked); returns the rows."""
        n = len(keys)
        if n > len(self.free):
            self._grow(n - len(self.free))
        taken = self.free[len(self.free) - n:]
        del self.free[len(self.free) - n:]
        taken.reverse()  # lowest rows first: a fresh table fills rows 0, 1, 2, ...
        d = self.by_group.setdefault(group, {})
        d.update(zip(keys, taken, strict=True))
        for r, k, p in zip(taken, keys, parents, strict=True):
            self.keys[r], self.parents[r] = k, p
        rows = np.array(taken, np.int64)
        self.ordinal[rows], self.group[rows], self.slot[rows] = ordinals, group, slots
        self.tier[rows], self.refcount[rows], self.priority[rows] = int(tier), 0, priority
        self.last_used[rows], self.live[rows], self.dead[rows] = clock, True, 0
        return rows

    def drop(self, rows: I64) -> None:
        """Forget these live rows."""
        for r in rows.tolist():
            del self.by_group[LayerGroupId(int(self.group[r]))][self.keys[r]]
            self.keys[r] = self.parents[r] = b""
            self.free.append(r)
        self.live[rows] = False

    def snapshot(self, row: int) -> CachedEntry:
        return CachedEntry(self.keys[row], LayerGroupId(int(self.group[row])), self.parents[row],
                           BlockIndex(int(self.ordinal[row])), SlotId(int(self.slot[row])),
                           TierId(int(self.tier[row])), int(self.refcount[row]), int(self.priority[row]),
                           int(self.last_used[row]), bool(self.dead[row]))

    def snapshots(self, rows: I64) -> list[CachedEntry]:
        """``snapshot`` for many rows, converting each column once."""
        cols = zip(rows.tolist(), self.group[rows].tolist(), self.ordinal[rows].tolist(), self.slot[rows].tolist(),
                   self.tier[rows].tolist(), self.refcount[rows].tolist(), self.priority[rows].tolist(),
                   self.last_used[rows].tolist(), self.dead[rows].tolist(), strict=True)
        return [CachedEntry(self.keys[r], LayerGroupId(g), self.parents[r], BlockIndex(o), SlotId(s), TierId(t),
                            c, p, u, bool(x)) for r, g, o, s, t, c, p, u, x in cols]

    def live_rows(self) -> I64:
        return np.flatnonzero(self.live).astype(np.int64)
