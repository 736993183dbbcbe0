"""The scheduler against the manager: admission counts a prefix hit's pages once, the
scheduler asks the manager before it steps, and liveness holds with the prefix cache on
(cached pages count as room only until a request takes them)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from hybridkv.cli.main import main
from hybridkv.core.errors import UsageError
from hybridkv.core.types import GPU, CacheHandle
from hybridkv.layouts.spec import BufferSpec, LayerSpec, ModelLayout
from hybridkv.lifecycles import Full, Ssm
from hybridkv.manager.manager import KVCacheManager
from hybridkv.planning.planner import PlanSpec, plan
from hybridkv.scheduler.request import SeqRequest, Status
from hybridkv.scheduler.scheduler import Scheduler, SchedulerConfig

FULL = LayerSpec(Full(), (BufferSpec("kv", 8),))  # 32-byte slots at 4 tokens per block


def test_admission_counts_prefix_hit_pages_once() -> None:
    """Request 2 hits 6 pages only the cache holds: they are free room *or* a saving, not both.
    It must wait instead of being admitted and preempted in the same call."""
    m = KVCacheManager(plan(PlanSpec(ModelLayout("t", (FULL,)), 12 * 32, 40, tokens_per_block=4, max_batch_size=2)))
    m.enable_prefix_cache()
    s = Scheduler(m, SchedulerConfig(max_batch_size=2, token_budget=64, prefill_chunk_tokens=64))
    p = np.arange(1000, 1040)
    s.submit(SeqRequest(0, 24, 1, tokens=p[:25]))
    s.complete(s.schedule(), 0)
    s.submit(SeqRequest(1, 16, 20, tokens=np.arange(2000, 2040)))
    s.complete(s.schedule(), 1)
    assert (m.tiers.free_slots(GPU), m.prefix is not None and m.prefix.reclaimable()) == ([2], [6])
    r2 = s.submit(SeqRequest(2, 36, 2, tokens=np.concatenate([p[:24], np.arange(5000, 5016)])))
    s.complete(s.schedule(), 2)
    assert s.preemptions == 0 and r2.status is Status.WAITING
    now = 3.0
    while s.num_waiting or m.rows.n:  # everyone finishes
        plan_ = s.schedule()
        assert plan_.advanced
        s.complete(plan_, now)
        m.check_invariants()
        now += 1
    # request 1 grew to 9 of the 12 slots meanwhile, taking the 3 deepest cached pages: the
    # 3 pages left serve 12 of request 2's tokens
    assert s.preemptions == 0 and r2.status is Status.FINISHED and s.reused_tokens == 12


@pytest.mark.parametrize("extra", [["--gpu-mem", "610795520"], ["--gpu-mem", "700000000", "--seed", "2"]])
def test_window_release_under_a_cache_pin_does_not_stall_the_head(extra: list[str],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Window blocks the head releases while the cache pins them become room in the same step
    (the run used to abort: 'the manager refused a step the demand function accepted')."""
    argv = ["simulate", "gemma-3-27b", "--max-batch-size", "1", "--max-seq-len", "2048",
            "--workload", "multi-turn", "--requests", "8", "--prefix-cache", "--json", *extra]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["completed"], out["deadlocked"]) == (8, False)
    assert out["resent_reuse_rate"] > 0  # the cache served resent turns


def _two_requests() -> tuple[KVCacheManager, Scheduler]:
    m = KVCacheManager(plan(PlanSpec(ModelLayout("t", (FULL,)), 24 * 32, 40, tokens_per_block=4, max_batch_size=3,
                                     host_bytes=24 * 32)))
    s = Scheduler(m, SchedulerConfig(max_batch_size=3, token_budget=64, prefill_chunk_tokens=8))
    s.submit(SeqRequest(0, 10, 5, tokens=np.arange(14)))
    s.submit(SeqRequest(1, 6, 5, tokens=np.arange(100, 110)))
    s.complete(s.schedule(), 0)
    return m, s


def test_suspend_moves_pages_down_and_admission_brings_them_back() -> None:
    m, s = _two_requests()
    held = m.lengths(m.active_handles()[1]).capacity
    assert s.suspend(1) and s.requests[1].status is Status.SUSPENDED and m.rows.n == 1
    assert s.suspensions == 1 and m.tiers.free_slots(GPU)[0] == 24 - 2  # request 0 holds 8 tokens: 2 blocks
    step = s.schedule()  # the suspended request is re-admitted (resumed) before anyone newer
    assert s.requests[1].status is Status.RUNNING and int(step.history[-1]) == held
    m.check_invariants()
    with pytest.raises(UsageError, match=r"suspend\(7\): the request must be running \(it is unknown\)"):
        s.suspend(7)


def test_fork_shares_the_computed_tokens_and_prefills_the_rest() -> None:
    m, s = _two_requests()
    assert m.lengths(m.active_handles()[0]).capacity == 8  # computed by the engine after the step
    with pytest.raises(UsageError, match=r"tokens \(9\) must be in 1..capacity \(8\)"):
        s.fork(0, SeqRequest(5, 12, 2, tokens=np.arange(13)), 9)
    t = s.fork(0, SeqRequest(5, 12, 2, tokens=np.arange(13)), 8)
    assert t is not None and t.status is Status.RUNNING and t.handle is not None
    child = m.lengths(CacheHandle(t.handle))
    assert (child.capacity, child.history) == (8, 8)
    parent = m.lengths(m.active_handles()[0])
    assert (parent.history, parent.committed) == (8, 8)  # moved to capacity and committed first
    step = s.schedule()
    i = int(np.flatnonzero(step.handles == t.handle)[0])
    assert (int(step.history[i]), int(step.capacity[i])) == (8, 12)  # the rest of its prompt
    m.check_invariants()


def test_finish_ends_a_request_early_and_frees_its_pages() -> None:
    m, s = _two_requests()
    s.finish(1, 5.0)
    assert s.requests[1].status is Status.FINISHED and s.requests[1].finish_s == 5.0 and m.rows.n == 1
    assert m.tiers.free_slots(GPU)[0] == 24 - 2
    m.check_invariants()


def test_finish_ends_a_suspended_or_waiting_request_too() -> None:
    """An engine that overlaps steps reads a stop token after the next ``schedule``, which may
    have suspended the request or left it waiting: ``finish`` ends it wherever it is."""
    m, s = _two_requests()
    assert s.suspend(1) and m.suspended
    s.submit(SeqRequest(2, 4, 3, tokens=np.arange(200, 206)))
    assert s.num_waiting == 2  # the suspended one, then the new one
    s.finish(1, 6.0)
    assert s.requests[1].status is Status.FINISHED and not m.suspended and s.num_waiting == 1
    assert m.tiers.free_slots(GPU)[0] == 24 - 2 and s.requests[1].handle is None
    s.finish(2, 7.0)
    assert s.requests[2].status is Status.FINISHED and s.num_waiting == 0 and s.requests[2].finish_s == 7.0
    m.check_invariants()

    def snapshot() -> tuple[Any, ...]:
        return (s.num_waiting, {i: (t.status, t.handle, t.finish_s) for i, t in s.requests.items()},
                tuple(m.tiers.free_slots(GPU)), m.rows.n, m.active_handles())

    before = snapshot()
    with pytest.raises(UsageError, match=r"finish\(2\): the request must be running, suspended or waiting "
                                         r"\(it is finished\)"):
        s.finish(2, 8.0)
    with pytest.raises(UsageError, match=r"it is unknown"):
        s.finish(9, 8.0)
    assert snapshot() == before  # a refused finish changes nothing
    step = s.schedule()  # only request 0 is left
    assert step.handles.tolist() == m.active_handles() and m.rows.n == 1
    m.check_invariants()


def test_a_state_model_resends_an_exchange_from_its_last_block_boundary() -> None:
    """A state snapshot exists only where a request stood after a step. An exchange of 10 prompt
    + 9 output tokens (tpb 4) computes 18 tokens and stops off a boundary, so the scheduler also
    publishes at the last boundary, 16 tokens. Resending the exchange plus a new message then
    reuses 16 tokens; an attention-only model publishes nothing extra."""
    ssm = LayerSpec(Ssm(), (BufferSpec("state", state_bytes=32),))
    for layers, reused in (((FULL, ssm), 16), ((FULL,), 16)):
        m = KVCacheManager(plan(PlanSpec(ModelLayout("t", layers), 64 * 32 * len(layers), 40, tokens_per_block=4,
                                         max_batch_size=2)))
        m.enable_prefix_cache()
        s = Scheduler(m, SchedulerConfig(max_batch_size=2, token_budget=64, prefill_chunk_tokens=64))
        exchange = np.arange(100, 119)  # 10 prompt tokens, then the 9 outputs
        s.submit(SeqRequest(0, 10, 9, tokens=exchange))
        now = 0.0
        while s.num_waiting or m.rows.n:
            s.complete(s.schedule(), now)
            m.check_invariants()
            now += 1
        assert m.prefix is not None
        resend = np.concatenate([exchange, np.arange(500, 506)])
        assert m.prefix.probe(resend) == reused  # the state model: 0 without the boundary publish
