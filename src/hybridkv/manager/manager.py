"""KVCacheManager: the object an engine holds.

Per request a cache with committed <= history <= capacity and a state (state.py). Active
caches live in dense rows of arrays (rows.py); one ``step`` call moves a whole batch to new
(capacity, history) with NumPy work per layer group (paging.py) and returns kernel-ready
tables (step_tables.py). Suspended caches keep their pages, which the manager moves to a
lower tier (tiers.py, eviction.py) when the GPU needs room. Every operation is atomic: when
pages are short it returns False / None and nothing changed; misuse raises UsageError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError, UsageError
from hybridkv.core.types import GPU, CacheHandle, TierId
from hybridkv.manager import invariants, moves, paging, sharing
from hybridkv.manager.cache_table import CacheTable
from hybridkv.manager.counters import Counters
from hybridkv.manager.prefix import PrefixCache
from hybridkv.manager.rows import ActiveRows
from hybridkv.manager.state import CacheLengths, RequestState, check_transition
from hybridkv.manager.stats import ManagerStats, collect_stats
from hybridkv.manager.step_tables import StepTables
from hybridkv.manager.suspended import SuspendedCache
from hybridkv.manager.tiers import StorageConfig, TierPools, Transfer
from hybridkv.manager.victims import POLICIES
from hybridkv.planning.planner import PoolPlan
from hybridkv.reuse import EventQueue, ReuseScope

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]


@dataclass(frozen=True)
class ManagerConfig:
    """Runtime settings besides the plan: how many caches may be active (default: the plan's
    ``max_batch_size``, the concurrency its guarantees were computed for), the eviction
    policy by name, and where each tier's bytes live."""

    max_active_requests: int | None = None
    eviction_policy: str = "priority-lru"
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if self.max_active_requests is not None and self.max_active_requests < 1:
            raise ConfigError(f"max_active_requests must be >= 1, got {self.max_active_requests}")
        if self.eviction_policy not in POLICIES:
            raise ConfigError(f"unknown eviction_policy {self.eviction_policy!r}; use one of {sorted(POLICIES)}")


class StepResult(NamedTuple):
    """What ``try_step`` did: the step's tables, or None and the GPU slots per pool group it
    lacked (all zero when it ran)."""

    tables: StepTables | None
    short: list[int]


class StepCheck(NamedTuple):
    """A step worked out against the current state without changing it: the batch's rows and
    new lengths, each layer group's page changes, the exact slot need, and how the room would
    be made (None when it cannot; ``short`` then says by how much per pool group, before
    counting suspended caches that could move)."""

    rows: I64
    capacity: I64
    history: I64
    deltas: list[paging.GroupDelta]
    need: paging.SlotNeed
    room: moves.RoomPlan | None
    short: list[int]


class KVCacheManager:
    """Paged KV caches for many requests over the pools of one plan."""

    def __init__(self, plan: PoolPlan, config: ManagerConfig | None = None) -> None:
        self.plan, self.config = plan, config or ManagerConfig()
        self.grouped = plan.grouped
        self.tokens_per_block = plan.spec.tokens_per_block
        self.max_seq_len = plan.spec.max_seq_len
        self.max_active_requests = self.config.max_active_requests or plan.spec.max_batch_size
        self.rows = ActiveRows(self.grouped, self.max_active_requests, self.max_seq_len)
        self.tiers = TierPools(plan, self.config.storage)
        self.policy = POLICIES[self.config.eviction_policy]()
        self.counters = Counters()
        self.caches = CacheTable()
        self.moving: dict[int, Transfer] = {}  # suspended caches whose pages are in flight
        self.orphaned: list[Transfer] = []  # moves of caches closed while in flight
        self._clock = 0
        self._mark = np.zeros(self.max_active_requests, np.int64)
        self.prefix: PrefixCache | None = None

    def enable_prefix_cache(self, scope: ReuseScope | None = None, events: EventQueue | None = None,
                            offload_to_host: bool = True) -> PrefixCache:
        """Keep committed blocks reusable across requests (manager/prefix.py)."""
        self.prefix = PrefixCache(self, scope, events, offload_to_host)
        return self.prefix

    # ---- lookup -------------------------------------------------------------------------
    @property
    def suspended(self) -> dict[int, SuspendedCache]:
        """Records of the suspended caches, by handle (owned by the cache table)."""
        return self.caches.suspended

    def state(self, handle: CacheHandle) -> RequestState:
        return self.caches.state(handle)

    def lengths(self, handle: CacheHandle) -> CacheLengths:
        st = self.state(handle)
        if st is RequestState.ACTIVE:
            r = self.caches.row(handle)
            return CacheLengths(int(self.rows.capacity[r]), int(self.rows.history[r]), int(self.rows.committed[r]))
        if st is RequestState.SUSPENDED:
            c = self.suspended[handle]
            return CacheLengths(c.capacity, c.history, c.committed)
        raise UsageError(f"request {handle} is closed")

    def active_handles(self) -> I64:
        """Active handles in row order: a batch in this order gets zero-copy tables."""
        out: I64 = self.rows.handle[:self.rows.n].copy()
        return out

    def row_of(self, handles: npt.ArrayLike) -> I64:
        """Rows of active handles (UsageError naming any handle that is not active)."""
        return self.caches.rows(np.asarray(handles, dtype=np.int64))

    # ---- life cycle ---------------------------------------------------------------------
    def create(self, priority: int = 0) -> CacheHandle:
        """A new, empty, suspended cache (``resume`` it to use it)."""
        return self.caches.create(SuspendedCache.empty(-1, self.rows.first_stale, priority, self._clock))

    def open(self, priority: int = 0) -> CacheHandle | None:
        """create + resume; None (and nothing left behind) when no active row is free."""
        if self.rows.n == self.rows.max_rows:
            return None
        h = self.create(priority)
        self.resume(h)
        return h

    def resume(self, handle: CacheHandle) -> bool:
        """Make a suspended cache active, bringing its pages to the GPU. False if there is no
        row, no room even after evicting other suspended caches, or its pages are in flight
        (``ready`` says so); then nothing changed. Pages on a tier whose loads finish later:
        the load starts (GPU slots reserved now, as a local resume would take them) and the
        answer is False; resume again once a poll (every step polls) has seen it finish."""
        check_transition("resume", handle, self.state(handle))
        cache = self.suspended[handle]
        if self.rows.n == self.rows.max_rows or handle in self.moving:
            return False
        if cache.tier != GPU:
            if not self.make_room(self._pages_per_pool(cache), exclude=handle):
                return False
            self._move(cache, GPU)
            if handle in self.moving:
                return False
        row = self.rows.add(handle, cache.capacity, cache.history, cache.committed, cache.priority)
        for g in range(len(cache.slots)):
            self.rows.set_pages(row, g, cache.ordinals[g], cache.slots[g], cache.released[g])
        self.caches.activate(handle, row)
        self.counters.resumes += 1
        return True

    def suspend(self, handle: CacheHandle) -> None:
        """Deactivate: pages stay where they are but may now be moved to a lower tier."""
        check_transition("suspend", handle, self.state(handle))
        row = self.caches.row(handle)
        pages = [self.rows.pages(row, g) for g in range(len(self.grouped.layer_groups))]
        released = [int(r[row]) for r in self.rows.released]
        self._clock += 1
        record = SuspendedCache(
            handle, int(self.rows.capacity[row]), int(self.rows.history[row]), int(self.rows.committed[row]),
            int(self.rows.priority[row]), self._clock, GPU,
            [o for o, _ in pages], [s for _, s in pages], released)
        self._remove_row(row)
        self.caches.deactivate(handle, record)
        self.counters.suspends += 1

    def close(self, handle: CacheHandle) -> None:
        """Free every page of the cache, on every tier."""
        st = self.state(handle)
        check_transition("close", handle, st)
        if st is RequestState.ACTIVE:
            row = self.caches.row(handle)
            self._free_pool_slots(GPU, self.rows.slots_by_pool(np.array([row]), len(self.grouped.pool_groups),
                                                               self.tokens_per_block))
            self._remove_row(row)
        else:
            cache = self.suspended[handle]
            if moves.orphan(self, handle) is None:  # in flight: freed when its jobs finish
                self._free_by_pool(cache.tier, cache.slots)
        self.caches.close(handle)

    def close_many(self, handles: npt.ArrayLike) -> None:
        """``close`` for many caches at once: active ones in one vectorized pass (one free per
        pool group, rows compacted together). UsageError (nothing changed) if a handle is
        unknown, named twice, or already closed."""
        h = np.asarray(handles, dtype=np.int64).ravel()
        if h.size == 0:
            return
        states = self.caches.states(h)
        if np.unique(h).size != h.size:
            raise UsageError("close_many: a handle is named twice")
        if (states == RequestState.CLOSED).any():
            check_transition("close", int(h[states == RequestState.CLOSED][0]), RequestState.CLOSED)
        active = h[states == RequestState.ACTIVE]
        if active.size:
            rows = self.caches.rows(active)
            self._free_pool_slots(GPU, self.rows.slots_by_pool(rows, len(self.grouped.pool_groups),
                                                               self.tokens_per_block))
            moved, new_rows = self.rows.remove_many(rows)
            self.caches.moved(moved, new_rows)
            self.caches.close(active)
        for handle in h[states == RequestState.SUSPENDED].tolist():
            self.close(CacheHandle(handle))

    def fork(self, handle: CacheHandle, tokens: int) -> CacheHandle | None:
        """A new active cache sharing ``handle``'s first ``tokens`` committed tokens (full
        blocks shared by reference, a partial last block and SSM state copied); see
        manager/sharing.py. None (nothing changed) without a free row or slots."""
        return sharing.fork(self, handle, tokens)

    def offload(self, handle: CacheHandle, tier: TierId | str | None = None) -> bool:
        """Move a suspended cache's pages down to ``tier`` (an id or a name); None: the first
        lower tier, down the list, with room whose transfers complete at once (the caller
        wants the GPU pages free now). False (nothing moved) without room, or while the
        cache's pages are in flight. To a tier whose stores finish later the call returns at
        once; the GPU pages stay reserved until a poll sees the store finish."""
        if self.state(handle) is not RequestState.SUSPENDED:
            raise UsageError(f"cannot offload request {handle}: only suspended caches move")
        cache = self.suspended[handle]
        if tier is None:
            local = [t for t in self.tiers.lower if self.tiers.immediate[t]]
            return any(moves.offload(self, cache, t) for t in local)
        dst = self.tiers.tier_id(tier) if isinstance(tier, str) else tier
        if dst == GPU or not 0 < dst < len(self.tiers.names):
            raise UsageError(f"offload({handle}) moves pages down to a lower tier ({', '.join(self.tiers.names[1:])}); "
                             "resume() brings them back")
        return moves.offload(self, cache, dst)

    def ready(self, handle: CacheHandle) -> bool:
        """Whether a suspended cache's pages may come back without waiting: not in flight
        and on the GPU or a tier whose loads complete at once (``resume`` may still lack room)."""
        if self.state(handle) is not RequestState.SUSPENDED:
            raise UsageError(f"ready({handle}): only a suspended cache waits for its pages")
        return handle not in self.moving and self.tiers.immediate[self.suspended[handle].tier]

    def poll(self) -> int:
        """Finish the page moves whose jobs a slow tier has completed (freeing their sources).
        Never waits; every step calls it first while moves are in flight. Returns how many
        moves finished."""
        return moves.poll(self) if self.moving or self.orphaned else 0

    def commit(self, handle: CacheHandle, tokens: int) -> None:
        """Record that the first ``tokens`` tokens are final (prefix reuse may share them)."""
        check_transition("commit", handle, self.state(handle))
        lengths = self.lengths(handle)
        if not lengths.committed <= tokens <= lengths.history:
            raise UsageError(f"commit({handle}, {tokens}): need committed {lengths.committed} <= tokens "
                             f"<= history {lengths.history}")
        if self.state(handle) is RequestState.ACTIVE:
            self.rows.committed[self.caches.row(handle)] = tokens
        else:
            self.suspended[handle].committed = tokens

    # ---- the batched step ---------------------------------------------------------------
    def step(self, handles: npt.ArrayLike, capacity: npt.ArrayLike, history: npt.ArrayLike) -> StepTables | None:
        """Move every request of the batch to its new (capacity, history): release stale window
        blocks, allocate new blocks, evict suspended caches if needed. All or nothing: None
        (nothing changed) when the pages do not exist even after eviction."""
        return self.try_step(handles, capacity, history).tables

    def try_step(self, handles: npt.ArrayLike, capacity: npt.ArrayLike, history: npt.ArrayLike) -> StepResult:
        """``step``, answering a refusal with what is short: the tables, or None and the GPU
        slots per pool group the step lacks (as ``shortfall`` says), having changed nothing.
        One planning pass serves both the question and the step. While page moves are in
        flight it first polls them (finished stores free GPU slots for this step): that is
        the only per-step cost of slow tiers, and a step never waits for them."""
        if self.moving or self.orphaned:
            moves.poll(self)
        check = self._check_step(handles, capacity, history)
        if check.room is None:
            return StepResult(None, self._short(check))
        return StepResult(self._apply_step(check, check.room), self._short(check))

    def _apply_step(self, check: StepCheck, room: moves.RoomPlan) -> StepTables:
        gpu = self.tiers.allocators[GPU]
        moves.apply_moves(self, room)
        paging.apply_frees(self.grouped, self.rows, check.deltas, gpu)
        moves.evict_cached(self, check.need.fill)
        paging.apply_grows(self.grouped, self.rows, check.deltas, gpu)
        rows, c_new, h_new = check.rows, check.capacity, check.history
        self.rows.capacity[rows], self.rows.history[rows], self.rows.seq_lens[rows] = c_new, h_new, c_new
        self.counters.steps += 1
        return StepTables(self.rows, rows, self.tokens_per_block)

    def shortfall(self, handles: npt.ArrayLike, capacity: npt.ArrayLike, history: npt.ArrayLike) -> list[int]:
        """GPU slots per pool group that ``step`` with these arguments would lack right now, after
        counting every page it may take (pages only the prefix cache holds, suspended caches a
        lower tier has room for): all zero means the step succeeds. Changes nothing; misuse
        raises as ``step`` would. The scheduler asks this before it steps."""
        return self._short(self._check_step(handles, capacity, history))

    def _short(self, check: StepCheck) -> list[int]:
        """Slots per pool group the checked step lacks: zeros when it has its room."""
        if check.room is not None:
            return [0] * len(self.grouped.pool_groups)
        return [max(0, s) for s in check.short]

    def _check_step(self, handles: npt.ArrayLike, capacity: npt.ArrayLike, history: npt.ArrayLike) -> StepCheck:
        rows = self.row_of(handles)
        c_new = np.asarray(capacity, dtype=np.int64)
        h_new = np.asarray(history, dtype=np.int64)
        self._validate_step(rows, c_new, h_new)
        deltas = paging.plan_step(self.grouped, self.rows, rows, c_new, h_new)
        need = paging.net_slots(self.grouped, self.rows, deltas, self.tiers.allocators[GPU])
        deficit = [n - f for n, f in zip(need.need, self.tiers.free_slots(GPU), strict=True)]
        room, short = moves.plan_room(self, deficit, cache_only_after=need.cache_only)
        return StepCheck(rows, c_new, h_new, deltas, need, room, short)

    def resize(self, handle: CacheHandle, capacity: int, history: int | None = None) -> bool:
        """One request's step: new capacity (and history, default unchanged). Atomic."""
        h = self.lengths(handle).history if history is None else history
        return self.step([handle], [capacity], [h]) is not None

    def _validate_step(self, rows: I64, c_new: I64, h_new: I64) -> None:
        if not rows.shape == c_new.shape == h_new.shape:
            raise UsageError(f"step: {rows.size} handles, {c_new.size} capacities, {h_new.size} histories")
        order = np.arange(rows.size)
        self._mark[rows] = order
        if (self._mark[rows] != order).any():
            raise UsageError("step: a request appears twice in one batch")
        c_old, h_old, committed = self.rows.capacity[rows], self.rows.history[rows], self.rows.committed[rows]
        bad_any = (h_new < h_old) | (h_new > c_old) | (c_new < h_new) | (c_new > self.max_seq_len) | (committed > c_new)
        if not bad_any.any():
            return
        checks = [(h_new < h_old, "history cannot move back", h_old),
                  (h_new > c_old, "history cannot pass the old capacity (no room was held for those tokens)", c_old),
                  (c_new < h_new, "capacity must be >= history", h_new),
                  (c_new > self.max_seq_len, "capacity exceeds max_seq_len", np.full_like(c_old, self.max_seq_len)),
                  (committed > c_new, "capacity below committed tokens", committed)]
        for bad, why, ref in checks:
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise UsageError(f"request {int(self.rows.handle[rows[i]])}: {why} (capacity {int(c_new[i])}, "
                                 f"history {int(h_new[i])}, limit {int(ref[i])})")

    # ---- tiers and eviction (manager/moves.py) -----------------------------------------
    def _pages_per_pool(self, cache: SuspendedCache) -> list[int]:
        return moves.pages_per_pool(self, cache)

    def make_room(self, need: list[int], exclude: int | None = None, keep: list[bytes] | None = None) -> bool:
        """Free GPU slots per pool group until ``need`` more fit: move suspended caches down
        (never ``exclude``), give up pages only the prefix cache holds (never ``keep``'s).
        False, having changed nothing, when even that is not enough."""
        return moves.make_room(self, need, exclude, keep)

    def _move(self, cache: SuspendedCache, dst: TierId) -> None:
        moves.move(self, cache, dst)

    def _free_by_pool(self, tier: TierId, slots_per_layer_group: list[I32]) -> None:
        """One free per pool group for one or more caches' pages (distinct within a cache by the
        ownership invariant; shared pages across caches are counted by the allocator)."""
        per_pool: list[list[I32]] = [[] for _ in self.grouped.pool_groups]
        for lg in self.grouped.layer_groups:
            per_pool[lg.pool_group].append(slots_per_layer_group[lg.id])
        self._free_pool_slots(tier, [np.concatenate(parts) for parts in per_pool])

    def _free_pool_slots(self, tier: TierId, slots_per_pool: list[I32]) -> None:
        for g, slots in enumerate(slots_per_pool):
            self.tiers.allocators[tier][g].free(slots, distinct=True)

    def _remove_row(self, row: int) -> None:
        moved = self.rows.remove(row)
        if moved is not None:
            self.caches.moved(moved, row)

    # ---- observability ------------------------------------------------------------------
    def stats(self, reset_peak: bool = False) -> ManagerStats:
        return collect_stats(self, reset_peak)

    def check_invariants(self) -> None:
        invariants.check(self)

    def close_storage(self) -> None:
        self.tiers.close()
