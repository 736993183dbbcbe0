"""Shared test helpers: ``snapshot(m)`` captures every byte of a manager's state, so a refused
operation (None / False / UsageError) can be checked to have changed nothing at all."""

from __future__ import annotations

from typing import Any

import numpy as np

from hybridkv.core.types import TierId
from hybridkv.manager.manager import KVCacheManager

HOST, DISK = TierId(1), TierId(2)
"""The lower tiers of the default list (``StorageConfig.local``): host memory, then disk."""


def _frozen(a: Any) -> tuple[str, tuple[int, ...], bytes]:
    arr = np.asarray(a)
    return arr.dtype.str, arr.shape, arr.tobytes()


def _buffer_bytes(buf: Any) -> Any:
    if buf is None:
        return None
    if hasattr(buf, "tensor"):  # torch backend (CPU or CUDA)
        return _frozen(buf.tensor.cpu().numpy())
    return _frozen(np.array(buf.array))


def snapshot(m: KVCacheManager, with_bytes: bool = True) -> dict[str, Any]:
    """Rows, allocators, suspended records, counters, handle tables and (optionally) buffer bytes.

    Values are hashable and compare with ``==``; pytest's dict diff names the key that moved.
    """
    r, n = m.rows, m.rows.n
    snap: dict[str, Any] = {"rows.n": n}
    for name in ("capacity", "history", "committed", "handle", "seq_lens", "priority"):
        snap[f"rows.{name}"] = _frozen(getattr(r, name)[:n])
    for g, table in enumerate(r.tables):
        snap[f"rows.tables[{g}]"] = _frozen(table[:n])
        rel = r.released[g]
        snap[f"rows.released[{g}]"] = None if rel is None else _frozen(rel[:n])
    for tier in m.tiers.ids:
        for g, a in enumerate(m.tiers.allocators[tier]):
            key = f"{m.tiers.names[tier].upper()}[{g}]"
            snap[f"alloc {key}"] = (_frozen(a._stack), a._top, _frozen(a._refs), a.peak_in_use,
                                    _frozen(a.is_pinned(np.arange(a.num_slots))), a.num_pinned, a.num_reclaimable)
            if with_bytes:
                snap[f"bytes {key}"] = _buffer_bytes(m.tiers.buffers[tier][g])
    snap["suspended"] = tuple(sorted(
        (h, c.capacity, c.history, c.committed, c.priority, c.last_used, c.tier,
         tuple(_frozen(o) for o in c.ordinals), tuple(_frozen(s) for s in c.slots), tuple(c.released))
        for h, c in m.suspended.items()))
    snap["counters"] = tuple(sorted(vars(m.counters).items()))
    snap["bytes_moved"] = tuple(sorted(m.tiers.bytes_moved.items()))
    if m.prefix is not None:
        snap["prefix"] = tuple(sorted((e.key, e.layer_group, e.slot, e.tier, e.last_used)
                                      for e in m.prefix.index.entries()))
    states, rows = m.caches.view()
    snap["handles"] = (m.caches.num_handles, m._clock, _frozen(states), _frozen(rows))
    return snap
