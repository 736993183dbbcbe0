"""The continuous-batching scheduler.

Each ``schedule()`` builds one step: every running request decodes one token or takes a
prefill chunk (decodes first, then chunks in arrival order, under ``token_budget``); then
waiting requests are admitted in arrival order while the next step still fits. Every
decision goes through the demand function (``per_request_demand``) checked against every
pool group; the manager's own accounting must agree (a refused step is an InvariantError).

Liveness (docs/ARCHITECTURE.md has the argument): the earliest-arrived running request
is never a victim, and the plan guarantees that one request alone can always take at least
one token. So every step advances some request, and every admitted request finishes.

The scheduler is built in layers, one file each: its settings (config.py); the request table,
the queue and the transitions between states (state.py); admission (admission.py); the
operations an engine asks for between steps (operations.py); and here the step itself:
``schedule`` and ``complete``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import InvariantError
from hybridkv.core.types import GPU, CacheHandle
from hybridkv.manager.step_tables import StepTables
from hybridkv.planning.demand import per_request_demand
from hybridkv.scheduler.admission import Admission
from hybridkv.scheduler.config import POLICIES, SchedulerConfig
from hybridkv.scheduler.operations import EngineOperations
from hybridkv.scheduler.request import Status, Tracked

__all__ = ["POLICIES", "Scheduler", "SchedulerConfig", "StepPlan"]

I64 = npt.NDArray[np.int64]


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


class Scheduler(Admission, EngineOperations):
    """Owns the queue and the running set over one KVCacheManager (the constructor is
    ``SchedulerState``'s)."""

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

    # ---- after the engine ran the step ------------------------------------------------
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
