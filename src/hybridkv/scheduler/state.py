"""The scheduler's state and the transitions of a request through it.

``SchedulerState`` owns the request table, the waiting queue (a heap in arrival order) and
the per-handle arrays the step reads; its methods are the transitions: submit (WAITING or
REJECTED), track (RUNNING on a manager row), suspend or preempt (SUSPENDED, or WAITING to
recompute), release (the row closed). Admission (admission.py), the engine's operations
(operations.py) and the step (scheduler.py) are built over it.
"""

from __future__ import annotations

import heapq

import numpy as np

from hybridkv.core.errors import ConfigError
from hybridkv.core.types import CacheHandle
from hybridkv.manager.manager import KVCacheManager
from hybridkv.planning.demand import lifetime_peak_demand
from hybridkv.scheduler.config import POLICIES, SchedulerConfig, check_token_budget
from hybridkv.scheduler.request import Progress, SeqRequest, Status, Tracked


class SchedulerState:
    """The queue, the tracked requests and their per-handle arrays over one KVCacheManager."""

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

    # ---- transitions: onto a row, off the GPU, closed ------------------------------------
    def _track(self, t: Tracked, handle: CacheHandle) -> None:
        t.handle = int(handle)
        self.by_handle[t.handle] = t
        self._grow_handle_arrays(t.handle)
        self._target[t.handle], self._order[t.handle] = t.prefill_target, t.seq
        self._max_new[t.handle] = t.spec.max_new_tokens
        self.policy.on_admit(self, t)
        self._chunk[t.handle] = t.chunk_limit or self.config.prefill_chunk_tokens

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

    def _dequeue(self, t: Tracked) -> None:
        """Take a waiting or suspended request out of the queue."""
        self._waiting.remove((t.seq, t.spec.request_id))
        heapq.heapify(self._waiting)
        self._keys.pop(t.spec.request_id, None)

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
