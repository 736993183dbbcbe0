"""A fake engine that proves the page tables right.

After every successful step it "computes" positions ``[history, capacity)`` of each request:
it writes a tag naming (request, layer, buffer, position) into the first 8 bytes of that
token's slice of every attention page, going only through the step's block tables and the
documented page layout (storage/pages.py); a state page gets a tag naming (request, layer,
buffer, last token seen). Which positions a step writes and which a page holds, each life
cycle says (``LifeCycle.written`` / ``readable`` / ``entry_positions``). ``verify()``
reads back every live position of every cache on whatever tier its pages sit (active
tables, or suspended records on host / disk) and raises InvariantError at the first wrong
byte. Buffers may be NumPy, memmap or torch (CPU or CUDA:
the reads and writes then run as torch indexing on that device).

Needs every ``bytes_per_token`` and ``state_bytes`` to be a multiple of 8.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError, InvariantError
from hybridkv.core.types import GPU, TierId
from hybridkv.manager.manager import KVCacheManager
from hybridkv.manager.prefix import PrefixCache
from hybridkv.manager.rows import NULL_SLOT
from hybridkv.reuse import CachedEntry, ReuseScope
from hybridkv.storage.pages import PageSpec, page_specs

I64 = npt.NDArray[np.int64]


def tag(handle: I64 | int, layer: int, buffer_index: int, position: I64 | int) -> Any:
    """Value written for one token (position) or one state (tokens seen)."""
    return ((np.int64(handle) * 1009 + layer) * 7 + buffer_index) * (1 << 32) + position + 1


class _Words:
    """An int64 view of a pool buffer, indexed by (slot, word) on its own device."""

    def __init__(self, buffer: Any) -> None:
        self.torch: Any = None
        if hasattr(buffer, "tensor"):
            import torch

            self.torch = torch
            self.device = buffer.tensor.device
            self.words = buffer.tensor.view(torch.int64)
        else:
            self.words = buffer.array.view(np.int64)

    def _idx(self, a: I64) -> Any:
        return a if self.torch is None else self.torch.as_tensor(a, device=self.device)

    def set(self, slots: I64, words: I64, values: I64) -> None:
        self.words[self._idx(slots), self._idx(words)] = self._idx(values)

    def get(self, slots: I64, words: I64) -> I64:
        out = self.words[self._idx(slots), self._idx(words)]
        return np.asarray(out if self.torch is None else out.cpu().numpy(), dtype=np.int64)


class FakeEngine:
    """Drives a KVCacheManager and checks every byte it wrote through the tables.

    It keeps, per cache, which request's tag each position of each layer group holds (for an
    SSM group the state's writer sits at ``p = tokens seen - 1``), and per cached entry the
    writers of its block: with forks and prefix reuse together one cache holds positions that
    different requests wrote (a fork of a prefix-cache hit, a partly copied block published
    later, a key dropped from one layer group and republished by another request).
    ``verify`` reads back every live position of every cache and every page the prefix index
    holds, on whichever tier it sits.
    """

    def __init__(self, m: KVCacheManager) -> None:
        self.m = m
        self.tpb = m.tokens_per_block
        self.specs = [page_specs(m.grouped, lg.id) for lg in m.grouped.layer_groups]
        for specs in self.specs:
            for s in specs:
                if s.offset % 8 or (s.bytes_per_token or s.page_bytes) % 8:
                    raise ConfigError("the fake engine needs 8-byte multiples for every page size")
        self.written: dict[int, int] = {}  # handle -> positions [0, n) carry tags
        self.groups = m.grouped.layer_groups
        width = max([m.max_seq_len] + [lg.life_cycle.table_width(m.max_seq_len, self.tpb) * self.tpb
                                       for lg in self.groups])
        self.shape = (len(self.groups), width)
        self.who: dict[int, I64] = {}
        self.entry_who: dict[tuple[bytes, int], I64] = {}  # (key, layer group) -> writer per block position

    def writers(self, h: int) -> I64:
        if h not in self.who:
            self.who[h] = np.full(self.shape, h, np.int64)
        return self.who[h]

    def step(self, handles: list[int], capacity: list[int], history: list[int]) -> bool:
        """``manager.step``, then tag the positions each group's life cycle says the step
        writes (tokens [history, capacity); a state only when it moves; an encoder once)."""
        seen = np.array([self.written.get(x, 0) for x in handles], np.int64)
        tables = self.m.step(handles, capacity, history)
        if tables is None:
            return False
        h = np.asarray(handles, np.int64)
        c, hist = np.asarray(capacity, np.int64), np.asarray(history, np.int64)
        for lg in self.groups:
            table, words = tables.block_table(lg.id), self._words(GPU, lg.pool_group)
            p = lg.life_cycle.written(c, hist, seen, self.tpb)
            slots = table[p.item, p.ordinal].astype(np.int64)
            for bi, spec in enumerate(self.specs[lg.id]):
                words.set(slots, (spec.offset + p.in_page * spec.bytes_per_token) // 8,
                          tag(h[p.item], spec.layer_id, bi, p.position))
            for i in np.unique(p.item).tolist():
                self.writers(int(h[i]))[lg.id, p.position[p.item == i]] = h[i]
        for x, cap in zip(h.tolist(), c.tolist(), strict=True):
            self.written[x] = cap
        return True

    def fork(self, donor: int, tokens: int) -> int | None:
        """``manager.fork``; the child reads the donor's writers wherever its life cycles say a
        fork takes the donor's pages (shared or copied), and its own everywhere else."""
        child = self.m.fork(donor, tokens)  # type: ignore[arg-type]
        if child is not None:
            donor_w, w = self.writers(donor), np.full(self.shape, int(child), np.int64)
            for lg in self.groups:
                lc = lg.life_cycle
                pos = lc.readable(lc.fork_pages(tokens, self.tpb).ordinals, tokens, self.tpb).position
                w[lg.id, pos] = donor_w[lg.id, pos]
            self.who[int(child)], self.written[int(child)] = w, tokens
        return child

    def publish(self, handle: int, tokens: npt.ArrayLike, upto: int, scope: ReuseScope | None = None) -> int:
        """``prefix.publish``; each entry it adds holds what ``handle`` holds at that block."""
        index = self._prefix().index
        before = {(e.key, int(e.layer_group)) for e in index.entries()}
        pinned = self._prefix().publish(handle, tokens, upto, scope)  # type: ignore[arg-type]
        for e in index.entries():
            g, o = int(e.layer_group), int(e.ordinal)
            if (e.key, g) not in before:
                self.entry_who[(e.key, g)] = self.writers(handle)[g, o * self.tpb:(o + 1) * self.tpb].copy()
        return pinned

    def open_with_prefix(self, tokens: npt.ArrayLike, scope: ReuseScope | None = None) -> tuple[int, int] | None:
        """``prefix.open``; each reused page (or state snapshot) reads as its entry's writers wrote it."""
        prefix = self._prefix()
        opened = prefix.open(tokens, scope=scope)
        if opened is None:
            return None
        h, reused = int(opened[0]), opened[1]
        gkeys = prefix.group_keys(prefix.keys(np.asarray(tokens)[:reused], scope), scope)
        w = self.writers(h)
        for lg, gk in zip(self.groups, gkeys, strict=True):
            for o in lg.life_cycle.needed_blocks(reused // self.tpb, self.tpb).tolist():
                if (gk[o], lg.id) in self.entry_who:  # else: left as h, verify flags it
                    pos = lg.life_cycle.entry_positions(o, self.tpb).position
                    w[lg.id, pos] = self.entry_who[(gk[o], lg.id)][pos - o * self.tpb]
        self.written[h] = reused
        return h, reused

    def forget(self, handle: int) -> None:
        self.written.pop(handle, None)
        self.who.pop(handle, None)

    def _prefix(self) -> PrefixCache:
        if self.m.prefix is None:
            raise ConfigError("the fake engine's publish / open_with_prefix need m.enable_prefix_cache()")
        return self.m.prefix

    def verify(self) -> int:
        """Every live position of every cache, and every page of the prefix index."""
        m, checked = self.m, 0
        for row in range(m.rows.n):
            pages = [m.rows.pages(row, lg.id) for lg in self.groups]
            checked += self._cache(int(m.rows.handle[row]), GPU, pages)
        for handle, cache in m.suspended.items():
            checked += self._cache(handle, cache.tier, list(zip(cache.ordinals, cache.slots, strict=True)))
        if self.m.prefix is not None:
            for e in self.m.prefix.index.entries():
                checked += self._entry(e)
        return checked

    def _cache(self, handle: int, tier: TierId, pages: list[tuple[I64, Any]]) -> int:
        written, w, checked = self.written.get(handle, 0), self.writers(handle), 0
        for lg in self.groups:
            ordinals, slots = pages[lg.id]
            if ordinals.size == 0:
                continue
            p = lg.life_cycle.readable(ordinals, written, self.tpb)
            checked += self._check(self._words(tier, lg.pool_group), slots.astype(np.int64)[p.item],
                                   self.specs[lg.id], w[lg.id, p.position], p.in_page, p.position)
        return checked

    def _entry(self, e: CachedEntry) -> int:
        lg, o = self.groups[int(e.layer_group)], int(e.ordinal)
        p = lg.life_cycle.entry_positions(o, self.tpb)
        writer = self.entry_who[(e.key, lg.id)][p.position - o * self.tpb]
        return self._check(self._words(e.tier, lg.pool_group), np.full(p.position.size, e.slot, np.int64),
                           self.specs[lg.id], writer, p.in_page, p.position)

    def _words(self, tier: TierId, pool_group: int) -> _Words:
        buf = self.m.tiers.buffers[tier][pool_group]
        if buf is None:
            raise ConfigError("the fake engine needs a manager with data (with_data=True)")
        return _Words(buf)

    @staticmethod
    def _check(words: _Words, slots: I64, specs: tuple[PageSpec, ...], writer: I64, in_page: I64, pos: I64) -> int:
        for bi, spec in enumerate(specs):
            got = words.get(slots, (spec.offset + in_page * spec.bytes_per_token) // 8)
            want = tag(writer, spec.layer_id, bi, pos)
            if not np.array_equal(got, want):
                i = int(np.flatnonzero(got != want)[0])
                raise InvariantError(f"request {int(np.broadcast_to(writer, got.shape)[i])}, layer "
                                     f"{spec.layer_id} {spec.buffer}: position/state "
                                     f"{int(np.broadcast_to(pos, got.shape)[i])} reads {int(got[i])}, "
                                     f"wrote {int(np.broadcast_to(want, got.shape)[i])}")
        return int(slots.size) * len(specs)


__all__ = ["NULL_SLOT", "FakeEngine", "tag"]
