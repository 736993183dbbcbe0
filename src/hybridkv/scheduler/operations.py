"""Operations an engine asks for between steps: ``finish`` (a stop token), ``suspend`` and
``fork`` (a running request's prefix shared by a new one)."""

from __future__ import annotations

from hybridkv.core.errors import ConfigError, InvariantError, UsageError
from hybridkv.core.types import CacheHandle
from hybridkv.scheduler.request import SeqRequest, Status, Tracked
from hybridkv.scheduler.state import SchedulerState


class EngineOperations(SchedulerState):
    """``finish``, ``suspend`` and ``fork`` on a running request."""

    def finish(self, request_id: int, now_s: float) -> None:
        """End a request before ``max_new_tokens`` (it sampled a stop token, or its client
        left). A running one publishes its computed tokens to the prefix cache, as
        ``complete`` does at the end; a suspended one is closed on its tier; a waiting one
        leaves the queue. An engine that overlaps steps reads a stop token one step late,
        after the next ``schedule`` may have suspended or preempted the request."""
        t = self.requests.get(request_id)
        if t is None or t.status not in (Status.RUNNING, Status.SUSPENDED, Status.WAITING):
            state = "unknown" if t is None else t.status.value
            raise UsageError(f"finish({request_id}): the request must be running, suspended or waiting (it is "
                             f"{state})")
        if t.status is not Status.RUNNING:
            self._dequeue(t)
        if t.handle is not None:
            h = CacheHandle(t.handle)
            if t.status is Status.RUNNING and self.manager.prefix is not None and t.spec.tokens is not None:
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
