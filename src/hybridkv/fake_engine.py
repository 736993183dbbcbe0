"""A fake engine that proves the page tables right.

After every successful step it "computes" positions ``[history, capacity)`` of each request:
it writes a tag naming (request, layer, buffer, position) into the first 8 bytes of that
token's slice of every attention page, going only through the step's block tables and the
documented page layout (storage/pages.py); an SSM state page gets a tag naming (request,
layer, buffer, tokens seen). ``verify()`` reads back every live position of every cache on
whatever tier its pages sit (active tables, or suspended records on host / disk) and raises
InvariantError at the first wrong byte. Buffers may be NumPy, memmap or torch (CPU or CUDA:
the reads and writes then run as torch indexing on that device).

Needs every ``bytes_per_token`` and ``state_bytes`` to be a multiple of 8.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from hybridkv.errors import ConfigError, InvariantError
from hybridkv.manager.manager import KVCacheManager
from hybridkv.manager.paging import expand
from hybridkv.manager.rows import NULL_SLOT
from hybridkv.storage.pages import PageSpec, page_specs
from hybridkv.types import Tier

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
    """Drives a KVCacheManager and checks every byte it wrote through the tables."""

    def __init__(self, manager: KVCacheManager) -> None:
        self.m = manager
        self.tpb = manager.tokens_per_block
        self.specs = [page_specs(manager.grouped, lg.id) for lg in manager.grouped.layer_groups]
        for specs in self.specs:
            for s in specs:
                if s.offset % 8 or (s.bytes_per_token or s.page_bytes) % 8:
                    raise ConfigError("the fake engine needs 8-byte multiples for every page size")
        self.written: dict[int, int] = {}  # handle -> positions [0, n) carry tags
        self.origin: dict[int, tuple[int, int]] = {}  # forked handle -> (donor, shared tokens)
        self.block_writer: dict[bytes, int] = {}  # published block key -> request that wrote it
        self.reused: dict[int, npt.NDArray[np.int64]] = {}  # handle -> writer of each reused block

    def _words(self, tier: Tier, pool_group: int) -> _Words:
        buf = self.m.tiers.buffers[tier][pool_group]
        if buf is None:
            raise ConfigError("the fake engine needs a manager with data (with_data=True)")
        return _Words(buf)

    def step(self, handles: list[int], capacity: list[int], history: list[int]) -> bool:
        """``manager.step`` then write the tags of positions [history, capacity)."""
        tables = self.m.step(handles, capacity, history)
        if tables is None:
            return False
        h = np.asarray(handles, np.int64)
        c, hist = np.asarray(capacity, np.int64), np.asarray(history, np.int64)
        for lg in self.m.grouped.layer_groups:
            table, words = tables.block_table(lg.id), self._words(Tier.GPU, lg.pool_group)
            if lg.life_cycle.is_ssm:
                # the state moves to ``capacity`` tokens; a step that leaves it there (a forked
                # child's first no-op step) must not relabel the donor's state as the child's
                seen = np.array([self.written.get(x, -1) for x in h.tolist()], np.int64)
                live = np.flatnonzero((c > 0) & (c != seen))
                self._write_state(words, table[live, 0].astype(np.int64), h[live], c[live], self.specs[lg.id])
                continue
            batch_idx, pos = expand(np.arange(h.size, dtype=np.int64), hist, c - hist)
            slots = table[batch_idx, pos // self.tpb].astype(np.int64)
            for bi, spec in enumerate(self.specs[lg.id]):
                words.set(slots, (spec.offset + (pos % self.tpb) * spec.bytes_per_token) // 8,
                          tag(h[batch_idx], spec.layer_id, bi, pos))
        for handle, cap in zip(h.tolist(), c.tolist(), strict=True):
            self.written[handle] = cap
        return True

    @staticmethod
    def _write_state(words: _Words, slots: I64, handles: I64, seen: I64, specs: tuple[PageSpec, ...]) -> None:
        for bi, spec in enumerate(specs):
            words.set(slots, np.full(slots.size, spec.offset // 8, np.int64), tag(handles, spec.layer_id, bi, seen))

    def fork(self, donor: int, tokens: int) -> int | None:
        """``manager.fork``; positions below ``tokens`` of the child carry the donor's tags."""
        child = self.m.fork(donor, tokens)  # type: ignore[arg-type]
        if child is not None:
            self.origin[int(child)] = (donor, tokens)
            self.written[int(child)] = tokens
        return child

    def publish(self, handle: int, tokens: npt.ArrayLike, upto: int) -> int:
        """``manager.prefix.publish``, remembering who wrote each newly cached block."""
        prefix = self.m.prefix
        assert prefix is not None
        keys = prefix.keys(np.asarray(tokens)[:upto])
        starts = np.arange(len(keys), dtype=np.int64) * self.tpb
        for key, who in zip(keys, self._writer(handle, starts).tolist(), strict=True):
            self.block_writer.setdefault(key, who)
        return prefix.publish(handle, tokens, upto)  # type: ignore[arg-type]

    def open_with_prefix(self, tokens: npt.ArrayLike) -> tuple[int, int] | None:
        """``manager.prefix.open``; the reused blocks read as their writers wrote them."""
        prefix = self.m.prefix
        assert prefix is not None
        opened = prefix.open(tokens)
        if opened is None:
            return None
        handle, reused = int(opened[0]), opened[1]
        keys = prefix.keys(np.asarray(tokens))[:reused // self.tpb]
        self.reused[handle] = np.array([self.block_writer[k] for k in keys], np.int64)
        self.written[handle] = reused
        return handle, reused

    def _writer(self, handle: int, pos: I64) -> I64:
        """Which request wrote each position of ``handle``'s cache (forks inherit prefixes,
        prefix-cache hits read their publishers' blocks)."""
        who = np.full(pos.shape, handle, np.int64)
        if handle in self.reused:
            blocks = self.reused[handle]
            inside = pos // self.tpb < blocks.size
            who[inside] = blocks[pos[inside] // self.tpb]
        h = handle
        while h in self.origin:
            donor, tokens = self.origin[h]
            who[(who == h) & (pos < tokens)] = donor
            h = donor
        return who

    def forget(self, handle: int) -> None:
        self.written.pop(handle, None)

    def verify(self) -> int:
        """Check every live position of every cache; returns the number of words checked."""
        checked = 0
        m = self.m
        for row in range(m.rows.n):
            handle = int(m.rows.handle[row])
            pages = [m.rows.pages(row, lg.id) for lg in m.grouped.layer_groups]
            checked += self._verify_cache(handle, Tier.GPU, pages)
        for handle, cache in m.suspended.items():
            pages = list(zip(cache.ordinals, cache.slots, strict=True))
            checked += self._verify_cache(handle, cache.tier, pages)
        return checked

    def _verify_cache(self, handle: int, tier: Tier, pages: list[tuple[I64, Any]]) -> int:
        written = self.written.get(handle, 0)
        checked = 0
        for lg in self.m.grouped.layer_groups:
            ordinals, slots = pages[lg.id]
            if ordinals.size == 0:
                continue
            words = self._words(tier, lg.pool_group)
            if lg.life_cycle.is_ssm:
                seen = np.array([written])
                checked += self._check(words, slots.astype(np.int64), self.specs[lg.id],
                                       self._writer(handle, seen - 1), lambda s: np.array([s.offset // 8]), seen)
                continue
            pos = (ordinals[:, None] * self.tpb + np.arange(self.tpb)[None, :]).ravel()
            keep = pos < written
            pos, slot = pos[keep], np.repeat(slots.astype(np.int64), self.tpb)[keep]
            checked += self._check(words, slot, self.specs[lg.id], self._writer(handle, pos),
                                   lambda s, p=pos: (s.offset + (p % self.tpb) * s.bytes_per_token) // 8, pos)
        return checked

    @staticmethod
    def _check(words: _Words, slots: I64, specs: tuple[PageSpec, ...], writer: I64, word_of: Any, pos: I64) -> int:
        for bi, spec in enumerate(specs):
            got = words.get(slots, word_of(spec))
            want = tag(writer, spec.layer_id, bi, pos)
            if not np.array_equal(got, want):
                i = int(np.flatnonzero(got != want)[0])
                raise InvariantError(f"request {int(np.broadcast_to(writer, got.shape)[i])}, layer "
                                     f"{spec.layer_id} {spec.buffer}: position/state "
                                     f"{int(np.broadcast_to(pos, got.shape)[i])} reads {int(got[i])}, "
                                     f"wrote {int(np.broadcast_to(want, got.shape)[i])}")
        return int(slots.size) * len(specs)


__all__ = ["NULL_SLOT", "FakeEngine", "tag"]
