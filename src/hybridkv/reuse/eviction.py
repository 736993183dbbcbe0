"""Eviction order for cached entries nobody uses (refcount 0), one policy per class.

Documented policy (``priority-lru``): dead entries first (no match can use them now, see
``reuse.dead``), then lowest priority, then least recently used (the
index's logical clock at the last insert / acquire / release / touch), then the deepest block
first (a chain loses its leaves before its root: a full-attention prefix with a hole in the
middle is useless past the hole) — except in *windowed* layer groups, which lose their
shallowest block first (a continuation needs the newest window, never the old blocks) — then
layer group, then row (insertion) order. Policies work on the index's arrays so ordering 100k
candidates stays a handful of NumPy passes.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError
from hybridkv.reuse.entries import EntryTable

I64 = npt.NDArray[np.int64]


class EvictionOrder:
    """Orders candidate rows; subclasses override ``order``."""

    name = "base"

    def order(self, t: EntryTable, rows: I64, limit: int | None, windowed: I64) -> I64:
        """Positions into ``rows`` (ascending row ids) of the first ``limit`` (all when None)
        candidates, first victim first. ``windowed``: layer groups that keep their newest blocks."""
        raise NotImplementedError

    def keys(self, t: EntryTable, rows: I64, windowed: I64) -> list[int]:
        """One int per row, smallest evicted first, in the same order as ``order``, with the
        row in the low ``ROW_BITS`` bits (``key & ROW_MASK``): for callers that keep
        candidates in a heap (one small object per item, compared without tuples)."""
        raise NotImplementedError


ROW_BITS = 40
ROW_MASK = (1 << ROW_BITS) - 1


class PriorityLRU(EvictionOrder):
    name = "priority-lru"

    def keys(self, t: EntryTable, rows: I64, windowed: I64) -> list[int]:
        # fields, most significant first: alive (1 bit), priority (+2^63), last_used, depth
        # (+2^40: windowed groups their ordinal, others minus it), layer group (16 bits), row (40 bits)
        groups = t.group[rows]
        depth = np.where(np.isin(groups, windowed), t.ordinal[rows], -t.ordinal[rows]) + (1 << 40)
        low = (groups.astype(np.uint64) << np.uint64(ROW_BITS)) | rows.astype(np.uint64)
        return [(((1 - x) << 64 | (p + (1 << 63))) << 168) | (u << 105) | (d << 56) | lo
                for x, p, u, d, lo in zip(t.dead[rows].tolist(), t.priority[rows].tolist(),
                                          t.last_used[rows].tolist(), depth.tolist(), low.tolist(), strict=True)]

    def order(self, t: EntryTable, rows: I64, limit: int | None, windowed: I64) -> I64:
        # The four keys are packed into one int64 when their ranges allow, so only the
        # `limit` smallest need sorting (a partition: O(n), not O(n log n)).
        if rows.size == 0:
            return rows
        prio, used, ords, groups = t.priority[rows], t.last_used[rows], t.ordinal[rows], t.group[rows]
        alive = 1 - t.dead[rows]
        p0, o_max = int(prio.min()), int(ords.max())
        depth = np.where(np.isin(groups, windowed), ords, o_max - ords)  # 0 = evicted first among equals
        spans = (int(prio.max()) - p0 + 1, int(used.max()) + 1, o_max + 1, int(groups.max()) + 1)
        if 2 * spans[0] * spans[1] * spans[2] * spans[3] >= 2**62:
            return np.lexsort((groups, depth, used, prio, alive))[:limit]
        key = (((alive * spans[0] + prio - p0) * spans[1] + used) * spans[2] + depth) * spans[3] + groups
        if limit is None or limit >= rows.size:
            return np.argsort(key, kind="stable")
        if limit == 0:
            return rows[:0]
        kth = np.partition(key, limit - 1)[limit - 1]
        below = np.flatnonzero(key < kth)  # ties at the cut keep row order, as the full sort would
        cand = np.concatenate([below, np.flatnonzero(key == kth)[:limit - below.size]])
        return cand[np.argsort(key[cand], kind="stable")]


POLICIES: dict[str, type[EvictionOrder]] = {PriorityLRU.name: PriorityLRU}


def make_policy(name: str) -> EvictionOrder:
    """The eviction order called ``name``; ConfigError naming the choices otherwise."""
    if name not in POLICIES:
        raise ConfigError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]()
