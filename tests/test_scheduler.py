"""The scheduler against the manager: admission counts a prefix hit's pages once, the
scheduler asks the manager before it steps, and liveness holds with the prefix cache on
(cached pages count as room only until a request takes them)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybridkv.cli.main import main
from hybridkv.core.types import GPU
from hybridkv.layouts.spec import BufferSpec, LayerSpec, ModelLayout
from hybridkv.lifecycles import Full
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
