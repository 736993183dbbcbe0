"""Admission: which waiting requests join the step, and how they become active.

The head of the queue is admitted while the next step still fits in every pool group (the
demand function, less the prefix cache's hit) and the policy agrees; a suspended request
resumes before newer ones, a fresh one opens a cache at its cached prefix.
"""

from __future__ import annotations

import heapq

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import InvariantError
from hybridkv.core.types import GPU, CacheHandle
from hybridkv.planning.demand import lifetime_peak_demand, per_request_demand
from hybridkv.scheduler.request import Status, Tracked
from hybridkv.scheduler.state import SchedulerState

I64 = npt.NDArray[np.int64]


class Admission(SchedulerState):
    """The admission gate and the moves into RUNNING it makes."""

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

    def _fitting_chunk(self, h: int, chunk: int, avail: I64) -> int:
        while chunk >= 1:
            if (per_request_demand(self.manager.grouped, [h + chunk], [h])[0] <= avail).all():
                return chunk
            chunk //= 2
        return 0

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
