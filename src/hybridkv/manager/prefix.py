"""The prefix cache: committed blocks stay reusable after their request moves on.

``publish(handle, tokens, upto)`` records the request's committed full blocks in a
``reuse.PrefixIndex`` (chained SHA-256 keys, scoped) and pins each newly cached page with one
reference of its own. A page therefore survives its request's window release and close, and
``open(tokens)`` can start a new cache at the longest prefix every layer group can serve: full
attention needs every block, a window group only its sink and window blocks at that point, an
SSM group a state snapshot taken at exactly that point (published with ``upto == history``).
Reused blocks are shared by reference (never written: the new cache continues in fresh
blocks); SSM snapshots are copied into the new cache's own state slot.

Memory policy: a pinned page that no cache uses costs a slot until the GPU needs it; then
pinned pages go in the index's order (lowest priority, least recently used, deepest block
first), copied to the host tier when it has room (a later hit brings them back) or dropped.
``reclaimable()`` counts them as free for admission in O(1); the order is kept incrementally
(manager/cache_pins.py), so taking k pages costs O(k log n) however many are cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from hybridkv.core.types import DEFAULT_TIER_NAMES, GPU, CacheHandle, TierId
from hybridkv.manager.cache_pins import PinnedPages
from hybridkv.manager.state import RequestState
from hybridkv.manager.view import ManagerView
from hybridkv.reuse import EventQueue, Match, PrefixIndex, ReuseScope, block_keys

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]


class _Chain(NamedTuple):
    """Where one layer group's published pages go in the index: its key chain, the chain's
    root (parent of block 0) and the token ids events report per block (None: events off)."""

    keys: Sequence[bytes]
    root: bytes
    tokens: npt.NDArray[np.int64] | None


@dataclass
class PrefixStats:
    """Reuse counters: prompt tokens offered to ``open``, tokens served from the cache, and
    ``hit_tokens[tier][layer_group]``: tokens of the pages each layer group found on each tier
    (a window group needs only its window, so its counts are smaller than full attention's)."""

    num_layer_groups: int
    lookups: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    hit_tokens: dict[str, list[int]] = field(default_factory=dict)
    evicted_pages: int = 0
    offloaded_pages: int = 0
    tier_names: tuple[str, ...] = DEFAULT_TIER_NAMES  # the keys of hit_tokens

    def __post_init__(self) -> None:
        self.hit_tokens = {name: [0] * self.num_layer_groups for name in self.tier_names}

    @property
    def hit_rate(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class PrefixHit(NamedTuple):
    """A probe's answer for admission: cached ``tokens`` and, per pool group, ``shared_pages``
    the hit uses that running caches already hold."""

    tokens: int
    shared_pages: tuple[int, ...]


class PrefixCache:
    """Prefix reuse over one ManagerView (create with ``ManagerView.enable_prefix_cache``)."""

    def __init__(self, m: ManagerView, scope: ReuseScope | None = None, events: EventQueue | None = None,
                 offload_to_host: bool = True) -> None:
        self.m, self.scope = m, scope or ReuseScope()
        self.lcs = [lg.life_cycle for lg in m.grouped.layer_groups]
        # a window / chunked group keeps its deepest blocks (the window a continuation needs)
        self.index = PrefixIndex(events, windowed_groups=[g for g, lc in enumerate(self.lcs) if not lc.deepest_first],
                                 life_cycles=self.lcs, tokens_per_block=m.tokens_per_block)
        self.offload_to_host = offload_to_host
        self.stats = PrefixStats(len(m.grouped.layer_groups), tier_names=tuple(m.tiers.names))
        pool_of_group = [int(lg.pool_group) for lg in m.grouped.layer_groups]
        self.pins_on = {t: PinnedPages(self.index, t, m.tiers.allocators[t], pool_of_group) for t in m.tiers.ids}
        self.pins = self.pins_on[GPU]

    def keys(self, tokens: npt.ArrayLike, scope: ReuseScope | None = None) -> list[bytes]:
        """The prompt's block keys under ``scope`` (the cache's own scope by default)."""
        return list(block_keys(tokens, self.m.tokens_per_block, scope or self.scope))

    def group_keys(self, keys: list[bytes], scope: ReuseScope | None = None) -> list[Sequence[bytes]]:
        """Per layer group, the keys its cached pages go under: the prompt's, unless its life
        cycle keys its content otherwise (an encoder's by the scope's inputs)."""
        root, tpb = (scope or self.scope).root(), self.m.tokens_per_block
        return [lc.reuse_keys(keys, root, tpb) for lc in self.lcs]

    def _match(self, keys: list[bytes], scope: ReuseScope | None) -> tuple[Match, list[Sequence[bytes]]]:
        gkeys = self.group_keys(keys, scope)
        return self.index.probe(keys, self.lcs, self.m.tokens_per_block, group_keys=gkeys), gkeys

    def probe(self, tokens: npt.ArrayLike, scope: ReuseScope | None = None) -> int:
        """Tokens a new request with this prompt would reuse (nothing changes)."""
        return self._match(self._usable(self.keys(tokens, scope), tokens), scope)[0].tokens

    def hit(self, tokens: npt.ArrayLike, keys: list[bytes] | None = None,
            scope: ReuseScope | None = None) -> PrefixHit:
        """What ``open(tokens)`` would reuse now: tokens, and per pool group the matched pages
        a running cache already holds (they cost the new request no slot). Matched pages only
        the cache holds are not among them: admission already counts them as free room
        (``reclaimable``), so the new request takes them like free slots. ``keys``: this
        prompt's ``keys(tokens)`` if already computed (a request waiting several steps hashes
        its prompt once). Changes nothing."""
        keys = self._usable(self.keys(tokens, scope) if keys is None else keys, tokens)
        match = self._match(keys, scope)[0]
        gpu = self.m.tiers.allocators[GPU]
        shared = [0] * len(self.m.grouped.pool_groups)
        for lg, mb in zip(self.m.grouped.layer_groups, match.per_group, strict=True):
            shared_ones = ~lg.life_cycle.reuse_copies(mb.slots.size)  # copies go to slots of its own
            on_gpu = mb.slots[(mb.tiers == GPU) & shared_ones]
            shared[lg.pool_group] += int((gpu[lg.pool_group].references(on_gpu) > 1).sum())
        return PrefixHit(match.tokens, tuple(shared))

    def _usable(self, keys: list[bytes], tokens: npt.ArrayLike) -> list[bytes]:
        # leave at least one prompt token to compute: the next token's logits come from it
        return keys[:(len(np.asarray(tokens)) - 1) // self.m.tokens_per_block]

    # ---- publish -------------------------------------------------------------------------
    def publish(self, handle: CacheHandle, tokens: npt.ArrayLike, upto: int, scope: ReuseScope | None = None) -> int:
        """Cache the request's full blocks below ``upto`` tokens, which the engine has computed
        (at most its capacity: call it after running a step, before the next ``step`` releases
        window blocks the cache should keep); returns how many new pages were pinned. Each life
        cycle says what it keeps (``publish_ordinals``): an SSM group a snapshot, only when
        ``upto`` is the capacity and a whole number of blocks."""
        m, tpb = self.m, self.m.tokens_per_block
        lengths = m.lengths(handle)
        upto = min(upto, lengths.capacity) // tpb * tpb
        if upto == 0 or m.state(handle) is not RequestState.ACTIVE:
            return 0
        keys = self.keys(np.asarray(tokens)[:upto], scope)
        gkeys, root = self.group_keys(keys, scope), (scope or self.scope).root()
        row, pinned = m.caches.row(handle), 0
        for lg, gk in zip(m.grouped.layer_groups, gkeys, strict=True):
            table = m.rows.tables[lg.id][row]
            held = np.flatnonzero(table >= 0).astype(np.int64)
            ords = lg.life_cycle.publish_ordinals(held, upto, lengths.capacity, tpb)
            if ords.size == 0:
                continue
            ids = self._no_tokens(ords) if lg.life_cycle.own_keys else self._block_tokens(tokens, ords)
            where = _Chain(gk, lg.life_cycle.chain_root(root), ids)
            src = table[lg.life_cycle.publish_sources(held, ords)]
            pinned += self._publish(lg.id, lg.pool_group, where, ords, src, lg.life_cycle.reuse_copies(ords.size))
        m.tiers.copy_engine.wait_for_copies()
        self._settle()
        return pinned

    def _settle(self) -> None:
        """Dead flags changed by inserts or removals change eviction keys: re-push those rows."""
        flipped = self.index.settle()
        if flipped.size:
            for pins in self.pins_on.values():
                pins.touched(flipped)

    def _publish(self, group: int, pool_group: int, where: _Chain, ords: I64, src: I32,
                 copied: npt.NDArray[np.bool_]) -> int:
        """Cache the pages ``src`` under ``ords``: shared ones as they are (the cache takes a
        reference of its own), copied ones (a state that keeps changing) as a snapshot in a
        fresh slot, taken only when not cached already and a slot is free right now."""
        alloc, tokens = self.m.tiers.allocators[GPU][pool_group], where.tokens
        if copied.any():
            cached = np.fromiter((self.index.entry(where.keys[o], group) is not None for o in ords.tolist()),
                                 np.bool_, ords.size)
            take = ~copied | (~cached & (int((copied & ~cached).sum()) <= alloc.num_free))
            ords, src, copied = ords[take], src[take], copied[take]
            tokens = None if tokens is None else tokens[take]
        slots = src.copy()
        if copied.any():
            slots[copied] = self.m.tiers.copy_to_fresh(pool_group, src[copied])
        res = self.index.insert(where.keys, ords, group, slots, GPU, root=where.root, block_tokens=tokens)
        fresh = res.new_mask
        self.pins.placed(pool_group, slots[fresh], res.rows[fresh])
        alloc.pin(slots[fresh & ~copied])  # the cache's own reference
        alloc.pin(slots[copied], retain=False)  # the fresh allocation is the cache's reference
        return res.num_new

    def _no_tokens(self, ords: I64) -> npt.NDArray[np.int64] | None:
        """Blocks not keyed by prompt tokens (an encoder's): events carry -1 as their token ids."""
        return None if self.index.events is None else np.full((ords.size, self.m.tokens_per_block), -1, np.int64)

    def _block_tokens(self, tokens: npt.ArrayLike, ords: I64) -> npt.NDArray[np.int64] | None:
        """Token ids of the given blocks, for KV events (None when events are off)."""
        if self.index.events is None:
            return None
        tpb = self.m.tokens_per_block
        rows: npt.NDArray[np.int64] = np.asarray(tokens, np.int64)[(ords[:, None] * tpb + np.arange(tpb)).ravel()]
        return rows.reshape(ords.size, tpb)

    # ---- reuse ---------------------------------------------------------------------------
    def open(self, tokens: npt.ArrayLike, priority: int = 0, keys: list[bytes] | None = None,
             scope: ReuseScope | None = None) -> tuple[CacheHandle, int] | None:
        """A new active cache for a prompt, starting at the longest cached prefix: (handle,
        reused tokens); capacity = history = committed = reused. None (nothing changed) when
        no row or no slots for the pages that must be brought back or copied. ``keys``: as in
        ``hit``."""
        m = self.m
        if m.rows.n == m.rows.max_rows:
            return None
        tok = np.asarray(tokens)
        keys = self._usable(self.keys(tok, scope) if keys is None else keys, tok)
        match, gkeys = self._match(keys, scope)
        need = [0] * len(m.grouped.pool_groups)
        for lg, mb in zip(m.grouped.layer_groups, match.per_group, strict=True):
            copies = int(lg.life_cycle.reuse_copies(mb.slots.size).sum()) if match.tokens else 0
            need[lg.pool_group] += int((mb.tiers != GPU).sum()) + copies
        keep = keys if not any(lc.own_keys for lc in self.lcs) else [k for gk in gkeys for k in gk]
        if not m.make_room(need, keep=keep):
            return None
        self.stats.lookups += 1
        self.stats.prompt_tokens += int(tok.size)
        handle = m.create(priority)
        m.resume(handle)
        if match.tokens == 0:
            return handle, 0
        self._adopt(m.caches.row(handle), match, keys, gkeys)
        return handle, match.tokens

    def _adopt(self, row: int, match: Match, keys: list[bytes], gkeys: list[Sequence[bytes]]) -> None:
        """Give the new cache in ``row`` the matched pages (brought back to the GPU, shared or
        copied as each life cycle says) and history ``match.tokens``; mark the keys used."""
        m, tpb, L = self.m, self.m.tokens_per_block, match.tokens
        m.rows.capacity[row] = m.rows.history[row] = m.rows.committed[row] = m.rows.seq_lens[row] = L
        gpu = m.tiers.allocators[GPU]
        for lg, mb, gk in zip(m.grouped.layer_groups, match.per_group, gkeys, strict=True):
            slots = self._onboard(gk, lg.id, mb.ordinals, mb.slots, mb.tiers)
            for t, name in enumerate(m.tiers.names):
                self.stats.hit_tokens[name][lg.id] += int((mb.tiers == t).sum()) * tpb
            lc, copied = lg.life_cycle, lg.life_cycle.reuse_copies(slots.size)
            gpu[lg.pool_group].retain(slots[~copied])
            if copied.any():  # e.g. the request's own state starts as a copy of the snapshot
                slots[copied] = self.m.tiers.copy_to_fresh(lg.pool_group, slots[copied])
            m.rows.set_pages(row, lg.id, lc.held_ordinals(L, tpb), slots.astype(np.int32), lc.stale_range(L, tpb).stop)
        m.tiers.copy_engine.wait_for_copies()
        touched = self.index.touch(keys[:L // tpb])
        for g, (lc, gk) in enumerate(zip(self.lcs, gkeys, strict=True)):
            if lc.own_keys:  # pages under a chain of their own
                touched = np.concatenate([touched, self.index.touch(gk, g)])
        for pins in self.pins_on.values():
            pins.touched(touched)
        self.stats.reused_tokens += L

    def _onboard(self, keys: Sequence[bytes], group: int, ords: I64, slots: I64, tiers: I64) -> I64:
        """GPU slots of matched pages, copying those found on a lower tier back (room checked)."""
        out = slots.copy()
        lower = np.flatnonzero(tiers != GPU)
        if lower.size == 0:
            return out
        pg = self.m.grouped.layer_groups[group].pool_group
        for tier in {TierId(int(t)) for t in tiers[lower]}:
            sel = lower[tiers[lower] == tier]
            rows = self.index.rows_of([keys[int(o)] for o in ords[sel]], group)
            new = self._move_pages(tier, GPU, pg, slots[sel], rows)
            self.index.move_rows(rows, GPU, new)
            out[sel] = new
        return out

    def _move_pages(self, src: TierId, dst: TierId, pool_group: int, slots: I64, rows: I64) -> I64:
        """Move pinned pages (of index ``rows``) between tiers: the pin travels with the page."""
        tiers = self.m.tiers
        self.pins_on[src].left(pool_group, slots)
        tiers.allocators[src][pool_group].unpin(slots, free=False)
        per_pool = [np.zeros(0, np.int32) for _ in self.m.grouped.pool_groups]
        per_pool[pool_group] = slots.astype(np.int32)
        moved: I64 = tiers.move(src, dst, per_pool)[pool_group].astype(np.int64)
        self.pins_on[dst].placed(pool_group, moved, rows)
        tiers.allocators[dst][pool_group].pin(moved, retain=False)
        return moved

    # ---- memory pressure -----------------------------------------------------------------
    def reclaimable(self) -> list[int]:
        """GPU slots per pool group held only by the cache (freed on demand): O(1)."""
        return self.pins.reclaimable()

    def evict(self, deficit: list[int], keep: list[bytes] | None = None) -> list[int]:
        """Free up to ``deficit`` GPU slots per pool group from cache-only pages, in eviction
        order (to the host tier while it has room, else dropped); returns the slots freed.
        Keys in ``keep`` (a match being served) are not touched."""
        freed = [0] * len(deficit)
        keep_set = set(keep or ())
        host = self._offload_tier()
        host_free = self.m.tiers.free_slots(host) if host is not None else [0] * len(deficit)
        for pg, want in enumerate(deficit):
            if want <= 0:
                continue
            rows, slots = self.pins.take(pg, want, keep_set)
            up = min(host_free[pg], rows.size)
            if up and host is not None:
                moved = self._move_pages(GPU, host, pg, slots[:up], rows[:up])
                self.index.move_rows(rows[:up], host, moved)
                self.stats.offloaded_pages += up
            if rows.size > up:
                self._drop(GPU, pg, rows[up:], slots[up:])
            freed[pg] = int(rows.size)
        return freed

    def _offload_tier(self) -> TierId | None:
        """Where evicted pages go: the first lower tier, when offloading is on and its copies
        complete at once (eviction frees GPU slots the operation needs now), else nowhere."""
        tiers = self.m.tiers
        if not self.offload_to_host or not tiers.lower or not tiers.immediate[tiers.lower[0]]:
            return None
        return tiers.lower[0]

    def cached_room(self, tier: TierId, keep: list[bytes] | None = None) -> list[int]:
        """Per pool group, slots of ``tier`` the cache could give up now: pages nobody but the
        cache holds, those of ``keep`` (a match being served) excepted. On the GPU that is what
        ``evict`` can free; on a lower tier, what ``drop_lower`` can."""
        pins = self.pins_on[tier]
        return [r - p for r, p in zip(pins.reclaimable(), pins.protected(keep), strict=True)]

    def drop_lower(self, tier: TierId, need: list[int], keep: list[bytes] | None = None) -> None:
        """Drop cached pages on a lower tier (eviction order, ``keep``'s excepted) until
        ``need`` slots per pool group are free there, to make room for a suspended cache
        moving down."""
        for pg, (n, f) in enumerate(zip(need, self.m.tiers.free_slots(tier), strict=True)):
            if n > f:
                self._drop(tier, pg, *self.pins_on[tier].take(pg, n - f, set(keep or ())))

    def _drop(self, tier: TierId, pool_group: int, rows: I64, slots: I64) -> None:
        self.pins_on[tier].left(pool_group, slots)
        self.index.remove_rows(rows)
        self.m.tiers.allocators[tier][pool_group].unpin(slots)
        self.stats.evicted_pages += int(rows.size)
        self._settle()
