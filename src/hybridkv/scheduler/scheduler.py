"""The continuous-batching scheduler.

Each ``schedule()`` builds one step: every running request decodes one token or takes a
prefill chunk (decodes first, then chunks in arrival order, under ``token_budget``); then
waiting requests are admitted in arrival order while the next step still fits. Every
decision goes through the demand function (``per_request_demand``) checked against every
pool group; the manager's own accounting must agree (a refused step is an InvariantError).

Liveness (docs/ARCHITECTURE.md has the argument): the earliest-arrived running request
is never a victim, and the plan guarantees that one request alone can always take at least
one token. So every step advances some request, and every admitted request finishes.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError, InvariantError, UsageError
from hybridkv.core.types import GPU, CacheHandle
from hybridkv.manager.manager import KVCacheManager
from hybridkv.manager.step_tables import StepTables
from hybridkv.planning.demand import lifetime_peak_demand, per_request_demand
from hybridkv.scheduler.max_utilization import MaxUtilization
from hybridkv.scheduler.no_evict import NoEvict
from hybridkv.scheduler.policy import SchedulingPolicy
from hybridkv.scheduler.request import Progress, SeqRequest, Status, Tracked

I64 = npt.NDArray[np.int64]
POLICIES: dict[str, type[SchedulingPolicy]] = {MaxUtilization.name: MaxUtilization, NoEvict.name: NoEvict}


def check_token_budget(token_budget: int, max_batch_size: int) -> None:
    """Every running request must be able to decode in one step."""
    if token_budget < max_batch_size:
        raise ConfigError(f"token_budget ({token_budget}) must be >= max_batch_size "
                          f"({max_batch_size}) so every running request can decode")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits, prefill chunking and the policy by name.
    ``max_batch_size`` defaults to the manager's active rows (the plan's ``max_batch_size``
    unless the manager was told otherwise): one home for the setting."""

    max_batch_size: int | None = None
    token_budget: int = 8192
    prefill_chunk_tokens: int = 2048
    policy: str = "max-utilization"

    def __post_init__(self) -> None:
        if (self.max_batch_size is not None and self.max_batch_size < 1) or self.prefill_chunk_tokens < 1:
            raise ConfigError("max_batch_size and prefill_chunk_tokens must be >= 1")
        if self.max_batch_size is not None:
            check_token_budget(self.token_budget, self.max_batch_size)
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; use one of {sorted(POLICIES)}")


@dataclass(frozen=True)
class StepPlan:
    """One step for the engine: the running batch in manager row order, tokens per request
    (0: waiting for budget), and the page tables. ``deadlocked``: nothing can advance."""

    handles: I64
    capacity: I64
    history: I64
    num_tokens: I64
    tables: StepTables | None
    deadlocked: bool = False

    @property
    def advanced(self) -> bool:
        return bool(self.num_tokens.sum() > 0)


class Scheduler:
    """Owns the queue and the running set over one KVCacheManager."""

    def __init__(self, manager: KVCacheManager, config: SchedulerConfig | None = None) -> None:
        self.manager, self.config = manager, config or SchedulerConfig()
        self.max_batch_size = self.config.max_batch_size or manager.max_active_requests
        if manager.max_active_requests < self.max_batch_size:
            raise ConfigError(f"manager max_active_requests ({manager.max_active_requests}) < max_batch_size "
                              f"({self.max_batch_size})")
        check_token_budget(self.config.token_budget, self.max_batch_size)
        self.policy = POLICIES[self.config.policy]()
        self.slots = list(manager.plan.slots)
        self.requests: dict[int, Tracked] = {}
        self.by_handle: dict[int, Tracked] = {}
        self._waiting: list[tuple[int, int]] = []  # heap of (seq, request_id)
        self._seq = 0
        self._target = np.zeros(0, np.int64)  # per handle: prefill target
        self._order = np.zeros(0, np.int64)  # per handle: arrival seq
        self._chunk = np.zeros(0, np.int64)  # per handle: prefill chunk cap
        self._max_new = np.zeros(0, np.int64)  # per handle: max_new_tokens
        self.progress = Progress()
        self.preemptions = self.suspensions = self.reused_tokens = 0
        self._resumed_now: set[int] = set()  # handles resumed by this step's admission
        self._keys: dict[int, list[bytes]] = {}  # request id -> block keys of its prompt (while waiting)
        # a state kind caches only a snapshot at the exact length a request stopped at, which a
        # resend can use only on a block boundary: publish once more at the last boundary
        self._boundary_snapshots = any(not lg.life_cycle.per_token for lg in manager.grouped.layer_groups)

    # ---- submission -------------------------------------------------------------------
    def submit(self, spec: SeqRequest) -> Tracked:
        """Queue a request, or refuse it now (status REJECTED, ``reason`` says why)."""
        if spec.request_id in self.requests:
            raise ConfigError(f"request id {spec.request_id} submitted twice")
        self.progress.reserve(self._seq)
        t = Tracked(spec, self._seq, self.progress, prefill_target=spec.prompt_tokens)
        self._seq += 1
        self.requests[spec.request_id] = t
        t.reason = self._never_fits(spec)
        if t.reason:
            t.status = Status.REJECTED
            return t
        heapq.heappush(self._waiting, (t.seq, spec.request_id))
        return t

    def _never_fits(self, spec: SeqRequest) -> str:
        limit = self.manager.max_seq_len
        if spec.total_tokens > limit:
            return f"needs {spec.total_tokens} tokens > max_seq_len {limit}"
        g = self.manager.grouped
        need = self.submission_demand(spec)
        for pg, (n, s) in enumerate(zip(need, self.slots, strict=True)):
            if n > s:
                lcs = "+".join(lc.describe() for lc in g.life_cycles(g.pool_groups[pg].id))
                return f"pool group {pg} ({lcs}) needs {n} slots even alone, it has {s}"
        return ""

    def submission_demand(self, spec: SeqRequest) -> tuple[int, ...]:
        """Slots per pool group the request needs alone at its peak, one token at a time: more
        than a pool group has and it is refused at submission."""
        return lifetime_peak_demand(self.manager.grouped, spec.prompt_tokens, spec.total_tokens, 1)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return self.manager.rows.n

    # ---- one step ---------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Choose this step's work, make room, admit, and allocate through the manager."""
        m, cap_override, made_room = self.manager, dict[int, int](), False
        for _ in range(3):
            hs = m.rows.handle[:m.rows.n].copy()
            h_new = m.rows.capacity[:m.rows.n].copy()  # last step's tokens are computed now
            tokens = self._tokens(hs, h_new, cap_override)
            new_d = per_request_demand(m.grouped, h_new + tokens, h_new)
            held = per_request_demand(m.grouped, h_new, m.rows.history[:m.rows.n])
            avail = self._free_gpu() + held.sum(axis=0)
            if (new_d.sum(axis=0) <= avail).all():
                break
            if not self.policy.preempts:
                raise InvariantError(f"policy {self.policy.name} would have to preempt: reservations broken")
            order = np.argsort(self._order[hs], kind="stable")
            fits = (np.cumsum(new_d[order], axis=0) <= avail).all(axis=1)
            keep = int(fits.argmin())  # fits is a True prefix then False
            if keep == 0:  # the head alone cannot take its chunk: shrink it (a decode is 1)
                head = int(order[0])
                chunk = self._fitting_chunk(int(h_new[head]), int(tokens[head]), avail)
                if chunk == 0:
                    return StepPlan(hs, h_new, h_new, np.zeros_like(h_new), None, deadlocked=True)
                cap_override[int(hs[head])] = chunk
                keep = 1
            for victim in hs[order[keep:]][::-1]:  # latest arrival first
                self._suspend_or_preempt(self.by_handle[int(victim)])
            made_room = True
        else:
            raise InvariantError("schedule() did not converge after making room")
        free_after = avail - new_d.sum(axis=0)
        budget = self.config.token_budget - int(tokens.sum())
        # after making room, admit nobody this step: a victim re-admitted into the slots it just
        # freed would only be evicted again next step (thrash)
        adm_h, adm_c, adm_hist = self._admit(free_after, 0 if made_room else budget)
        hs, c = np.concatenate([hs, adm_h]), np.concatenate([h_new + tokens, adm_c])
        hist = np.concatenate([h_new, adm_hist])
        return self._step_agreed(hs, c, hist, adm_h.size)

    def _step_agreed(self, hs: I64, c: I64, hist: I64, admitted: int) -> StepPlan:
        """Take the step, the manager answering a refusal with what is short. Without shared
        pages the demand function is exact and the step always fits; with them (prefix hits,
        forks) a page one request releases may still be held by another, so per-request
        demand can overstate the room. Then give way: the latest admitted request goes back
        to the queue unharmed, then the latest arrival is suspended or preempted, and the head
        alone halves its chunk (it cannot be short at one token: docs/ARCHITECTURE.md)."""
        m = self.manager
        sharing = any(a.shared for a in m.tiers.allocators[GPU])
        while True:
            result = m.try_step(hs, c, hist)
            if result.tables is not None:
                return StepPlan(hs, c, hist, c - hist, result.tables)
            if not sharing:
                raise InvariantError("the manager refused a step the demand function accepted "
                                     f"(short {result.short} slots per pool group)")
            if admitted:
                i = hs.size - 1
                self._unadmit(self.by_handle[int(hs[i])])
                admitted -= 1
            elif hs.size > 1:
                i = int(np.argmax(self._order[hs]))
                self._suspend_or_preempt(self.by_handle[int(hs[i])])
            else:
                if c[0] - hist[0] <= 1:
                    raise InvariantError(f"request {self.by_handle[int(hs[0])].spec.request_id} cannot take one "
                                         "token with the GPU to itself: the plan's floor (a) is broken")
                c = hist + (c - hist) // 2
                continue
            keep = np.arange(hs.size) != i
            hs, c, hist = hs[keep], c[keep], hist[keep]

    def _unadmit(self, t: Tracked) -> None:
        """Undo this step's admission of ``t`` (it has computed nothing since): back to the
        queue in its arrival place, not counted as a preemption or suspension."""
        assert t.handle is not None
        if t.handle in self._resumed_now:  # its pages came up this step: send them back down
            self._suspend_or_preempt(t)
            return
        self._release(t)
        t.status = Status.WAITING
        heapq.heappush(self._waiting, (t.seq, t.spec.request_id))

    def _tokens(self, hs: I64, h: I64, cap_override: dict[int, int]) -> I64:
        """Decodes take 1 token; prefill chunks share the rest of the budget in arrival order."""
        target = self._target[hs]
        prefill = np.flatnonzero(h < target)
        tokens = np.ones(hs.size, np.int64)
        if prefill.size:
            prefill = prefill[np.argsort(self._order[hs[prefill]], kind="stable")]
            want = np.minimum(target[prefill] - h[prefill], self._chunk[hs[prefill]])
            for i, handle in enumerate(hs[prefill].tolist()):
                if handle in cap_override:
                    want[i] = min(want[i], cap_override[handle])
            budget = self.config.token_budget - (hs.size - prefill.size)
            before = np.cumsum(want) - want
            tokens[prefill] = np.clip(budget - before, 0, want)
        return tokens

    def _fitting_chunk(self, h: int, chunk: int, avail: I64) -> int:
        while chunk >= 1:
            if (per_request_demand(self.manager.grouped, [h + chunk], [h])[0] <= avail).all():
                return chunk
            chunk //= 2
        return 0

    def _admit(self, free: I64, budget: int) -> tuple[I64, I64, I64]:
        """Admit waiting requests in arrival order while the step still fits. ``free``: slots
        left after this step; a resumed cache also needs its pages on the GPU *before* the
        step, out of the slots free right now."""
        m, out_h, out_c, out_hist = self.manager, [], [], []
        free_now = self._free_gpu()
        self._resumed_now.clear()
        while self._waiting and m.rows.n < self.max_batch_size and budget > 0:
            t = self.requests[self._waiting[0][1]]
            reused = np.zeros_like(free)
            if t.status is Status.SUSPENDED:
                assert t.handle is not None
                h = m.lengths(CacheHandle(t.handle)).capacity
                held = per_request_demand(m.grouped, [h], [m.lengths(CacheHandle(t.handle)).history])[0]
            else:
                h, shared = self._cached_prefix(t)
                held, reused = np.zeros_like(free), np.asarray(shared, np.int64)
            chunk = self._first_chunk(t)
            tok = 1 if h >= t.prefill_target else min(chunk, t.prefill_target - h, budget)
            need = np.maximum(per_request_demand(m.grouped, [h + tok], [h])[0] - reused, held)
            if (need > free).any() and m.rows.n == 0 and tok > 1:  # alone: a smaller chunk must fit
                tok = max(self._fitting_chunk(h, tok, free), 1)
                need = np.maximum(per_request_demand(m.grouped, [h + tok], [h])[0] - reused, held)
            if (need > free).any() or (held > free_now).any() or not self.policy.admits(self, t):
                break
            if t.preemptions and m.rows.n and (self._prefill_peak(t, tok) > free).any():
                break  # a recomputing request comes back only with room for its whole prefill
            if t.status is Status.SUSPENDED:
                assert t.handle is not None
                self._resumed_now.add(t.handle)
            if not self._activate(t, h):
                break  # the prefix pages could not be brought back now
            heapq.heappop(self._waiting)
            free, free_now, budget = free - need, free_now - held, budget - tok
            out_h.append(t.handle)
            out_c.append(h + tok)
            out_hist.append(h)
        return (np.asarray(out_h, np.int64), np.asarray(out_c, np.int64), np.asarray(out_hist, np.int64))

    def _prefill_peak(self, t: Tracked, chunk: int) -> I64:
        peak = lifetime_peak_demand(self.manager.grouped, t.prefill_target, t.prefill_target, chunk)
        return np.asarray(peak, dtype=np.int64)

    def _first_chunk(self, t: Tracked) -> int:
        """Prefill chunk cap for a request about to be admitted (a resumed one keeps its own)."""
        if t.handle is not None:
            return int(self._chunk[t.handle])
        return self.policy.chunk_for(self, t)

    def _free_gpu(self) -> I64:
        """Free GPU slots per pool group, counting pages only the prefix cache holds (the
        manager evicts those on demand)."""
        free = np.asarray(self.manager.tiers.free_slots(GPU), dtype=np.int64)
        if self.manager.prefix is not None:
            free += np.asarray(self.manager.prefix.reclaimable(), dtype=np.int64)
        return free

    def _cached_prefix(self, t: Tracked) -> tuple[int, tuple[int, ...]]:
        """Tokens of the request's prompt (prefill target) the prefix cache can serve now, and
        per pool group the hit's pages running caches already hold (they need no slot; the
        others are reclaimable pages, already counted as free, or on a lower tier)."""
        if self.manager.prefix is None or t.spec.tokens is None:
            return 0, (0,) * len(self.slots)
        hit = self.manager.prefix.hit(t.spec.tokens[:t.prefill_target], self._prompt_keys(t))
        return hit.tokens, hit.shared_pages

    def _prompt_keys(self, t: Tracked) -> list[bytes]:
        """Block keys of the prompt to prefill, hashed once per prefill target (a waiting head
        is probed every step)."""
        assert self.manager.prefix is not None and t.spec.tokens is not None
        keys = self._keys.get(t.spec.request_id)
        if keys is None or len(keys) != t.prefill_target // self.manager.tokens_per_block:
            keys = self._keys[t.spec.request_id] = self.manager.prefix.keys(t.spec.tokens[:t.prefill_target])
        return keys

    def _activate(self, t: Tracked, reused: int = 0) -> bool:
        """Make ``t`` active: resume it, or open a cache (at ``reused`` cached tokens)."""
        m = self.manager
        if t.status is Status.SUSPENDED:
            assert t.handle is not None
            if not m.resume(CacheHandle(t.handle)):
                raise InvariantError(f"request {t.spec.request_id}: resume refused after the demand check")
        else:
            if reused:
                assert m.prefix is not None and t.spec.tokens is not None
                opened = m.prefix.open(t.spec.tokens[:t.prefill_target], t.spec.priority, self._prompt_keys(t))
                if opened is None or opened[1] != reused:
                    if opened is not None:
                        m.close(opened[0])
                    return False
                handle: CacheHandle | None = opened[0]
                self.reused_tokens += reused
            else:
                handle = m.open(t.spec.priority)
            if handle is None:
                raise InvariantError("no active row although running < max_batch_size")
            self._track(t, handle)
        self._keys.pop(t.spec.request_id, None)  # admitted: not probed again
        t.status = Status.RUNNING
        return True

    def _track(self, t: Tracked, handle: CacheHandle) -> None:
        t.handle = int(handle)
        self.by_handle[t.handle] = t
        self._grow_handle_arrays(t.handle)
        self._target[t.handle], self._order[t.handle] = t.prefill_target, t.seq
        self._max_new[t.handle] = t.spec.max_new_tokens
        self.policy.on_admit(self, t)
        self._chunk[t.handle] = t.chunk_limit or self.config.prefill_chunk_tokens

    # ---- operations an engine asks for between steps -------------------------------------
    def finish(self, request_id: int, now_s: float) -> None:
        """End a running request before ``max_new_tokens`` (it sampled a stop token): its
        computed tokens are published to the prefix cache, as ``complete`` does at the end,
        and its pages freed."""
        t = self._running(request_id, "finish")
        assert t.handle is not None
        h = CacheHandle(t.handle)
        if self.manager.prefix is not None and t.spec.tokens is not None:
            self.manager.prefix.publish(h, t.spec.tokens, self.manager.lengths(h).capacity)
        self._release(t)
        t.status, t.finish_s = Status.FINISHED, now_s

    def suspend(self, request_id: int) -> bool:
        """Take a running request off the GPU now, as a victim would be: its pages go down
        to the first lower tier with room (True; admission resumes it before newer requests),
        or, without room, its KV is dropped and it recomputes when re-admitted (False)."""
        t = self._running(request_id, "suspend")
        self._suspend_or_preempt(t)
        return t.status is Status.SUSPENDED

    def fork(self, parent_id: int, spec: SeqRequest, tokens: int) -> Tracked | None:
        """Start ``spec`` as a running request whose first ``tokens`` tokens are the running
        request ``parent_id``'s (``KVCacheManager.fork``: full blocks shared, a partial block
        and SSM state copied); it prefills the rest of its prompt. Between steps the engine
        has computed the parent's tokens up to its capacity, so ``tokens`` may be up to the
        capacity (the parent's history is first moved there and committed; an SSM state can
        only be forked there) and must be shorter than the new prompt. None (nothing changed)
        without a free row or pages now; a request that could never fit is REJECTED as in
        ``submit``."""
        parent, m = self._running(parent_id, "fork"), self.manager
        assert parent.handle is not None
        h = CacheHandle(parent.handle)
        lengths = m.lengths(h)
        if not 0 < tokens <= lengths.capacity or tokens >= spec.prompt_tokens:
            raise UsageError(f"fork({parent_id}): tokens ({tokens}) must be in 1..capacity ({lengths.capacity}) and "
                             f"< the new prompt ({spec.prompt_tokens} tokens), which computes at least one token")
        if spec.request_id in self.requests:
            raise ConfigError(f"request id {spec.request_id} submitted twice")
        if self._never_fits(spec):
            return self.submit(spec)  # REJECTED, with the reason
        if m.rows.n >= self.max_batch_size:
            return None
        if tokens > lengths.history and not m.resize(h, lengths.capacity, lengths.capacity):
            raise InvariantError(f"request {parent_id}: moving history to capacity needs no pages, yet was refused")
        if tokens > m.lengths(h).committed:
            m.commit(h, tokens)
        handle = m.fork(h, tokens)
        if handle is None:
            return None
        self.progress.reserve(self._seq)
        t = Tracked(spec, self._seq, self.progress, status=Status.RUNNING, prefill_target=spec.prompt_tokens)
        self._seq += 1
        self.requests[spec.request_id] = t
        self._track(t, handle)
        return t

    def _running(self, request_id: int, what: str) -> Tracked:
        t = self.requests.get(request_id)
        if t is None or t.status is not Status.RUNNING or t.handle is None:
            state = "unknown" if t is None else t.status.value
            raise UsageError(f"{what}({request_id}): the request must be running (it is {state})")
        return t

    def _grow_handle_arrays(self, handle: int) -> None:
        if handle >= self._target.size:
            n = max(2 * self._target.size, handle + 1, 1024)
            self._target = np.resize(self._target, n)
            self._order = np.resize(self._order, n)
            self._chunk = np.resize(self._chunk, n)
            self._max_new = np.resize(self._max_new, n)

    def _suspend_or_preempt(self, t: Tracked) -> None:
        """Free a victim's GPU pages: to a lower tier when one has room, else drop its KV
        (it recomputes prompt + outputs so far when re-admitted, before newer requests)."""
        assert t.handle is not None
        h = CacheHandle(t.handle)
        self.manager.suspend(h)
        if self.manager.offload(h):  # down the tier list, to the first with room
            t.status, t.suspensions = Status.SUSPENDED, t.suspensions + 1
            self.suspensions += 1
        else:
            self._release(t)
            t.status, t.preemptions = Status.WAITING, t.preemptions + 1
            t.prefill_target = t.spec.prompt_tokens + t.generated
            self.preemptions += 1
        heapq.heappush(self._waiting, (t.seq, t.spec.request_id))

    def _release(self, t: Tracked) -> None:
        assert t.handle is not None
        self.manager.close(CacheHandle(t.handle))
        self._forget(t)

    def _forget(self, t: Tracked) -> None:
        """Drop the scheduler's hold on ``t``'s (already closed) cache."""
        assert t.handle is not None
        self.by_handle.pop(t.handle)
        self.policy.on_exit(self, t)
        t.handle = None

    def _at_last_boundary(self, handles: I64, capacity: I64) -> npt.NDArray[np.bool_]:
        """Which of these decoding requests stand at the last block boundary before their
        end (prompt + max_new_tokens - 1 computed tokens): a state snapshot there is the one
        a resend of the whole exchange can resume from."""
        tpb = self.manager.tokens_per_block
        out = np.zeros(handles.size, np.bool_)
        for i in np.flatnonzero(capacity % tpb == 0).tolist():
            spec = self.by_handle[int(handles[i])].spec
            out[i] = int(capacity[i]) == (spec.prompt_tokens + spec.max_new_tokens - 1) // tpb * tpb
        return out

    # ---- after the engine ran the step ------------------------------------------------
    def complete(self, plan: StepPlan, now_s: float) -> list[Tracked]:
        """Record the step's outputs: a request whose computed tokens reach its prefill
        target emits one token; those with max_new_tokens outputs finish (pages freed).
        Vectorized over the batch; only requests with an event (first token, publish,
        finish) are touched one by one."""
        emitting = (plan.num_tokens > 0) & (plan.capacity >= self._target[plan.handles])
        handles = plan.handles[emitting]
        seqs = self._order[handles]
        before = self.progress.generated[seqs]
        last = before + 1 >= self._max_new[handles]
        prefix = self.manager.prefix
        if prefix is not None:
            # publish the computed blocks: the prompt once prefilled, the whole exchange at the
            # end, and for a state model the last block boundary before the end
            publish = (before == 0) | last
            if self._boundary_snapshots:
                publish |= self._at_last_boundary(handles, plan.capacity[emitting])
            for i in np.flatnonzero(publish).tolist():
                t = self.by_handle[int(handles[i])]
                if t.spec.tokens is not None:
                    h = CacheHandle(int(handles[i]))
                    prefix.publish(h, t.spec.tokens, self.manager.lengths(h).capacity)
        self.progress.generated[seqs] = before + 1
        for handle in handles[before == 0].tolist():
            self.by_handle[handle].first_token_s = now_s
        finished = [self.by_handle[h] for h in handles[last].tolist()]
        if finished:
            self.manager.close_many(handles[last])
            for t in finished:
                self._forget(t)
                t.status, t.finish_s = Status.FINISHED, now_s
        return finished
