"""Prefix sharing (fork): shared full blocks by reference, copied partial blocks and SSM
state, window groups needing only their window, atomic refusals; the fake engine checks
that every cache reads exactly what its writers wrote, donors included."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import HOST, snapshot
from hybridkv.core.errors import UsageError
from hybridkv.core.types import GPU
from hybridkv.engine.fake import FakeEngine
from hybridkv.layouts.spec import ModelLayout, attention_layer, ssm_layer
from hybridkv.lifecycles import Full, Sliding
from hybridkv.manager.manager import KVCacheManager, ManagerConfig
from hybridkv.planning.planner import PlanSpec, plan

TPB = 4


def manager(layers: tuple, gpu_bytes: int = 40_000, host_bytes: int = 0) -> tuple[KVCacheManager, FakeEngine]:
    p = plan(PlanSpec(ModelLayout("t", layers), gpu_bytes, 64, tokens_per_block=TPB, max_batch_size=2,
                      host_bytes=host_bytes))
    m = KVCacheManager(p, ManagerConfig(max_active_requests=8))
    return m, FakeEngine(m)


FULL = attention_layer(1, 8, 2, Full())
WINDOW = attention_layer(1, 8, 2, Sliding(6, 2))


def prefill(m: KVCacheManager, e: FakeEngine, tokens: int) -> int:
    h = m.open()
    assert h is not None and e.step([h], [tokens], [0])
    assert m.resize(h, tokens, tokens)  # the engine computed them: history catches up
    m.commit(h, tokens)
    return h


def refs(m: KVCacheManager, lg: int, slots: np.ndarray) -> list[int]:
    return m.tiers.allocators[GPU][m.grouped.layer_groups[lg].pool_group].references(slots).tolist()


def test_full_blocks_are_shared_and_a_partial_block_is_copied() -> None:
    m, e = manager((FULL,))
    a = prefill(m, e, 10)  # blocks 0, 1 full, block 2 holds tokens 8, 9
    b = e.fork(a, 10)
    assert b is not None and m.lengths(b) == m.lengths(a)
    ta, tb = m.rows.tables[0][m.row_of([a])[0]], m.rows.tables[0][m.row_of([b])[0]]
    assert ta[:2].tolist() == tb[:2].tolist() == [0, 1] and ta[2] == 2 and tb[2] == 3
    assert refs(m, 0, ta[:3]) == [2, 2, 1]
    e.verify()
    assert e.step([a, b], [16, 13], [10, 10])  # both write on: into their own blocks only
    m.check_invariants()
    e.verify()
    m.close(a)  # the shared blocks survive for b
    m.check_invariants()
    e.verify()
    assert refs(m, 0, tb[:2]) == [1, 1]
    m.close(b)
    m.check_invariants()
    assert m.stats().pool(0).in_use == 0


def test_window_group_shares_only_live_blocks_and_refuses_released_prefixes() -> None:
    m, e = manager((FULL, WINDOW))
    a = prefill(m, e, 8)
    assert e.step([a], [20], [8]) and m.resize(a, 20, 20)
    m.commit(a, 20)
    # history 20, window 6: blocks [0] (sinks) and [3, 5) live; a fork at 8 needs block 1: released
    before = snapshot(m)
    with pytest.raises(UsageError, match="already released block 1"):
        m.fork(a, 8)
    assert snapshot(m) == before
    b = e.fork(a, 20)
    assert b is not None
    assert m.rows.pages(m.row_of([b])[0], 1)[0].tolist() == [0, 3, 4]
    m.check_invariants()
    e.verify()
    assert e.step([b], [27], [20])  # the child's window release drops references, not pages
    m.check_invariants()
    e.verify()


def test_ssm_state_is_copied_at_the_donor_history() -> None:
    m, e = manager((FULL, ssm_layer(4, 4, 2, 4)))
    a = prefill(m, e, 8)
    with pytest.raises(UsageError, match="SSM state exists only"):
        m.fork(a, 4)
    b = e.fork(a, 8)
    assert b is not None
    sa, sb = (m.rows.tables[1][m.row_of([h])[0], 0] for h in (a, b))
    assert sa != sb and refs(m, 1, np.array([sa, sb])) == [1, 1]
    e.verify()
    assert e.step([a, b], [9, 10], [8, 8])
    e.verify()
    m.check_invariants()


def test_fork_without_room_changes_nothing() -> None:
    m, e = manager((FULL,), gpu_bytes=16 * 8 * 2 * TPB * 2)  # 16 slots
    a = prefill(m, e, 62)  # 16 blocks: the pool is full
    before = snapshot(m)
    assert m.fork(a, 62) is None  # the partial last block needs a fresh slot
    assert snapshot(m) == before
    b = m.fork(a, 60)  # full blocks only: no new slot needed
    assert b is not None
    m.check_invariants()


def test_suspending_a_fork_copies_shared_pages_down_and_back() -> None:
    m, e = manager((FULL, WINDOW), host_bytes=40_000)
    a = prefill(m, e, 12)
    b = e.fork(a, 12)
    assert b is not None
    m.suspend(b)
    assert m.offload(b, HOST)
    m.check_invariants()
    e.verify()
    m.close(a)
    m.check_invariants()
    assert m.resume(b)
    m.check_invariants()
    e.verify()


def test_misuse() -> None:
    m, e = manager((FULL,))
    a = prefill(m, e, 8)
    with pytest.raises(UsageError):
        m.fork(a, 9)  # beyond committed
    with pytest.raises(UsageError):
        m.fork(a, 0)
    m.suspend(a)
    with pytest.raises(UsageError, match="must be active"):
        m.fork(a, 8)
