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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt

from hybridkv.core.types import RequestId, Tier
from hybridkv.lifecycles.lifecycle import keep_start
from hybridkv.manager.cache_pins import PinnedPages
from hybridkv.manager.state import RequestState
from hybridkv.reuse import EventQueue, PrefixIndex, ReuseScope, block_keys

if TYPE_CHECKING:
    from hybridkv.manager.manager import KVCacheManager

I64 = npt.NDArray[np.int64]


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

    def __post_init__(self) -> None:
        self.hit_tokens = {t.name: [0] * self.num_layer_groups for t in Tier}

    @property
    def hit_rate(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class PrefixHit(NamedTuple):
    """A probe's answer for admission: cached ``tokens`` and, per pool group, ``shared_pages``
    the hit uses that running caches already hold."""

    tokens: int
    shared_pages: tuple[int, ...]


class PrefixCache:
    """Prefix reuse over one KVCacheManager (create with ``KVCacheManager.enable_prefix_cache``)."""

    def __init__(self, m: KVCacheManager, scope: ReuseScope | None = None, events: EventQueue | None = None,
                 offload_to_host: bool = True) -> None:
        self.m, self.scope = m, scope or ReuseScope()
        self.lcs = [lg.life_cycle for lg in m.grouped.layer_groups]
        # a window / chunked group keeps its deepest blocks (the window a continuation needs)
        self.index = PrefixIndex(events, windowed_groups=[g for g, lc in enumerate(self.lcs)
                                                          if not (lc.is_full or lc.is_ssm)])
        self.offload_to_host = offload_to_host
        self.stats = PrefixStats(len(m.grouped.layer_groups))
        pool_of_group = [int(lg.pool_group) for lg in m.grouped.layer_groups]
        self.pins_on = {t: PinnedPages(self.index, t, m.tiers.allocators[t], pool_of_group) for t in Tier}
        self.pins = self.pins_on[Tier.GPU]

    def keys(self, tokens: npt.ArrayLike) -> list[bytes]:
        return list(block_keys(tokens, self.m.tokens_per_block, self.scope))

    def probe(self, tokens: npt.ArrayLike) -> int:
        """Tokens a new request with this prompt would reuse (nothing changes)."""
        return self.index.probe(self._usable(self.keys(tokens), tokens), self.lcs, self.m.tokens_per_block).tokens

    def hit(self, tokens: npt.ArrayLike, keys: list[bytes] | None = None) -> PrefixHit:
        """What ``open(tokens)`` would reuse now: tokens, and per pool group the matched pages
        a running cache already holds (they cost the new request no slot). Matched pages only
        the cache holds are not among them: admission already counts them as free room
        (``reclaimable``), so the new request takes them like free slots. ``keys``: this
        prompt's ``keys(tokens)`` if already computed (a request waiting several steps hashes
        its prompt once). Changes nothing."""
        keys = self._usable(self.keys(tokens) if keys is None else keys, tokens)
        match = self.index.probe(keys, self.lcs, self.m.tokens_per_block)
        gpu = self.m.tiers.allocators[Tier.GPU]
        shared = [0] * len(self.m.grouped.pool_groups)
        for lg, mb in zip(self.m.grouped.layer_groups, match.per_group, strict=True):
            if lg.life_cycle.is_ssm:  # the new request copies the snapshot into a slot of its own
                continue
            on_gpu = mb.slots[mb.tiers == Tier.GPU]
            shared[lg.pool_group] += int((gpu[lg.pool_group].references(on_gpu) > 1).sum())
        return PrefixHit(match.tokens, tuple(shared))

    def _usable(self, keys: list[bytes], tokens: npt.ArrayLike) -> list[bytes]:
        # leave at least one prompt token to compute: the next token's logits come from it
        return keys[:(len(np.asarray(tokens)) - 1) // self.m.tokens_per_block]

    # ---- publish -------------------------------------------------------------------------
    def publish(self, handle: RequestId, tokens: npt.ArrayLike, upto: int) -> int:
        """Cache the request's full blocks below ``upto`` tokens, which the engine has computed
        (at most its capacity: call it after running a step, before the next ``step`` releases
        window blocks the cache should keep); returns how many new pages were pinned. SSM
        groups get a snapshot only when ``upto`` is the capacity and a whole number of blocks."""
        m, tpb = self.m, self.m.tokens_per_block
        lengths = m.lengths(handle)
        upto = min(upto, lengths.capacity) // tpb * tpb
        if upto == 0 or m.state(handle) is not RequestState.ACTIVE:
            return 0
        keys = self.keys(np.asarray(tokens)[:upto])
        row, pinned = int(m._row[handle]), 0
        gpu = m.tiers.allocators[Tier.GPU]
        for lg in m.grouped.layer_groups:
            table = m.rows.tables[lg.id][row]
            if lg.life_cycle.is_ssm:
                if upto != lengths.capacity or table[0] < 0 or gpu[lg.pool_group].num_free == 0:
                    continue
                last = np.array([upto // tpb - 1], np.int64)
                if self.index.rows_of([keys[-1]], lg.id).size:
                    continue  # this snapshot is cached already
                snap = gpu[lg.pool_group].allocate(1)
                assert snap is not None
                buf = m.tiers.buffers[Tier.GPU][lg.pool_group]
                if buf is not None:
                    m.tiers.copy_engine.copy(buf, table[:1], buf, snap)
                res = self.index.insert(keys, last, lg.id, snap, Tier.GPU, root=self.scope.root(),
                                        block_tokens=self._block_tokens(tokens, last))
                self.pins.placed(lg.pool_group, snap, res.rows)
                gpu[lg.pool_group].pin(snap, retain=False)  # the allocation is the cache's reference
                pinned += res.num_new
                continue
            ords = np.flatnonzero(table[:upto // tpb] >= 0).astype(np.int64)
            if ords.size == 0:
                continue
            res = self.index.insert(keys, ords, lg.id, table[ords], Tier.GPU, root=self.scope.root(),
                                    block_tokens=self._block_tokens(tokens, ords))
            fresh = table[ords][res.new_mask]
            self.pins.placed(lg.pool_group, fresh, res.rows[res.new_mask])
            gpu[lg.pool_group].pin(fresh)  # the cache's own reference
            pinned += res.num_new
        m.tiers.copy_engine.wait_for_copies()
        return pinned

    def _block_tokens(self, tokens: npt.ArrayLike, ords: I64) -> npt.NDArray[np.int64] | None:
        """Token ids of the given blocks, for KV events (None when events are off)."""
        if self.index.events is None:
            return None
        tpb = self.m.tokens_per_block
        rows: npt.NDArray[np.int64] = np.asarray(tokens, np.int64)[(ords[:, None] * tpb + np.arange(tpb)).ravel()]
        return rows.reshape(ords.size, tpb)

    # ---- reuse ---------------------------------------------------------------------------
    def open(self, tokens: npt.ArrayLike, priority: int = 0,
             keys: list[bytes] | None = None) -> tuple[RequestId, int] | None:
        """A new active cache for a prompt, starting at the longest cached prefix: (handle,
        reused tokens); capacity = history = committed = reused. None (nothing changed) when
        no row or no slots for the pages that must be brought back or copied. ``keys``: as in
        ``hit``."""
        m, tpb = self.m, self.m.tokens_per_block
        if m.rows.n == m.rows.max_rows:
            return None
        tok = np.asarray(tokens)
        keys = self._usable(self.keys(tok) if keys is None else keys, tok)
        match = self.index.probe(keys, self.lcs, tpb)
        need = [0] * len(m.grouped.pool_groups)
        for lg, mb in zip(m.grouped.layer_groups, match.per_group, strict=True):
            copies = 1 if lg.life_cycle.is_ssm and match.tokens else 0  # the request's own state
            need[lg.pool_group] += int((mb.tiers != Tier.GPU).sum()) + copies
        if not m._make_room(need, keep=keys):
            return None
        self.stats.lookups += 1
        self.stats.prompt_tokens += int(tok.size)
        handle = m.create(priority)
        m.resume(handle)
        if match.tokens == 0:
            return handle, 0
        L, row = match.tokens, int(m._row[handle])
        m.rows.capacity[row] = m.rows.history[row] = m.rows.committed[row] = m.rows.seq_lens[row] = L
        gpu = m.tiers.allocators[Tier.GPU]
        for lg, mb in zip(m.grouped.layer_groups, match.per_group, strict=True):
            slots = self._onboard(keys, lg.id, mb.ordinals, mb.slots, mb.tiers)
            for t in Tier:
                self.stats.hit_tokens[t.name][lg.id] += int((mb.tiers == t).sum()) * tpb
            if lg.life_cycle.is_ssm:  # the request's own state starts as a copy of the snapshot
                own = gpu[lg.pool_group].allocate(1)
                assert own is not None
                buf = m.tiers.buffers[Tier.GPU][lg.pool_group]
                if buf is not None:
                    m.tiers.copy_engine.copy(buf, slots.astype(np.int32), buf, own)
                m.rows.set_pages(row, lg.id, np.zeros(1, np.int64), own, 0)
                continue
            gpu[lg.pool_group].retain(slots)
            released = max(m.rows.first_stale[lg.id], int(keep_start(lg.life_cycle, L)) // tpb)
            m.rows.set_pages(row, lg.id, mb.ordinals, slots.astype(np.int32), released)
        m.tiers.copy_engine.wait_for_copies()
        touched = self.index.touch(keys[:L // tpb])
        for pins in self.pins_on.values():
            pins.touched(touched)
        self.stats.reused_tokens += L
        return handle, L

    def _onboard(self, keys: list[bytes], group: int, ords: I64, slots: I64, tiers: I64) -> I64:
        """GPU slots of matched pages, copying those found on a lower tier back (room checked)."""
        out = slots.copy()
        lower = np.flatnonzero(tiers != Tier.GPU)
        if lower.size == 0:
            return out
        pg = self.m.grouped.layer_groups[group].pool_group
        for tier in {Tier(int(t)) for t in tiers[lower]}:
            sel = lower[tiers[lower] == tier]
            rows = self.index.rows_of([keys[int(o)] for o in ords[sel]], group)
            new = self._move_pages(tier, Tier.GPU, pg, slots[sel], rows)
            self.index.move_rows(rows, Tier.GPU, new)
            out[sel] = new
        return out

    def _move_pages(self, src: Tier, dst: Tier, pool_group: int, slots: I64, rows: I64) -> I64:
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
        host_free = self.m.tiers.free_slots(Tier.HOST)
        for pg, want in enumerate(deficit):
            if want <= 0:
                continue
            rows, slots = self.pins.take(pg, want, keep_set)
            up = min(host_free[pg], rows.size) if self.offload_to_host else 0
            if up:
                moved = self._move_pages(Tier.GPU, Tier.HOST, pg, slots[:up], rows[:up])
                self.index.move_rows(rows[:up], Tier.HOST, moved)
                self.stats.offloaded_pages += up
            if rows.size > up:
                self._drop(Tier.GPU, pg, rows[up:], slots[up:])
            freed[pg] = int(rows.size)
        return freed

    def cached_room(self, tier: Tier, keep: list[bytes] | None = None) -> list[int]:
        """Per pool group, slots of ``tier`` the cache could give up now: pages nobody but the
        cache holds, those of ``keep`` (a match being served) excepted. On the GPU that is what
        ``evict`` can free; on a lower tier, what ``drop_lower`` can."""
        pins = self.pins_on[tier]
        return [r - p for r, p in zip(pins.reclaimable(), pins.protected(keep), strict=True)]

    def drop_lower(self, tier: Tier, need: list[int], keep: list[bytes] | None = None) -> None:
        """Drop cached pages on a lower tier (eviction order, ``keep``'s excepted) until
        ``need`` slots per pool group are free there, to make room for a suspended cache
        moving down."""
        for pg, (n, f) in enumerate(zip(need, self.m.tiers.free_slots(tier), strict=True)):
            if n > f:
                self._drop(tier, pg, *self.pins_on[tier].take(pg, n - f, set(keep or ())))

    def _drop(self, tier: Tier, pool_group: int, rows: I64, slots: I64) -> None:
        self.pins_on[tier].left(pool_group, slots)
        self.index.remove_rows(rows)
        self.m.tiers.allocators[tier][pool_group].unpin(slots)
        self.stats.evicted_pages += int(rows.size)
