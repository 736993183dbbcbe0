"""The manager's prefix cache: published blocks outlive their request, reuse starts a new
cache at the longest prefix every layer group can serve, scopes never share, reused pages are
never written, pinned pages go (to the host, or dropped) when the GPU needs room, and the fake
engine reads exactly what the donors wrote."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import HOST, snapshot
from hybridkv.core.types import GPU
from hybridkv.engine.fake import FakeEngine
from hybridkv.layouts.spec import ModelLayout, attention_layer, ssm_layer
from hybridkv.lifecycles import Chunked, Full, Sliding
from hybridkv.manager.manager import KVCacheManager, ManagerConfig
from hybridkv.planning.planner import PlanSpec, plan
from hybridkv.reuse import ReuseScope

TPB = 4
FULL = attention_layer(1, 8, 2, Full())
WINDOW = attention_layer(1, 8, 2, Sliding(6, 2))


def setup(layers: tuple, gpu_slots: int = 200, host_slots: int = 0, scope: ReuseScope | None = None,
          ) -> tuple[KVCacheManager, FakeEngine]:
    slot = 2 * 8 * 2 * TPB  # bytes of one slot of one layer
    groups = len({(lyr.life_cycle) for lyr in layers})
    max_seq_len = min(128, gpu_slots * TPB)
    p = plan(PlanSpec(ModelLayout("t", layers), gpu_slots * slot * groups, max_seq_len, tokens_per_block=TPB,
                      max_batch_size=2, host_bytes=host_slots * slot * groups))
    m = KVCacheManager(p, ManagerConfig(max_active_requests=8))
    m.enable_prefix_cache(scope)
    return m, FakeEngine(m)


def run(m: KVCacheManager, e: FakeEngine, tokens: np.ndarray) -> tuple[int, int]:
    """Open with reuse, prefill the rest, publish everything computed, return (handle, reused)."""
    opened = e.open_with_prefix(tokens)
    assert opened is not None
    h, reused = opened
    assert e.step([h], [tokens.size], [reused])
    e.publish(h, tokens, tokens.size)  # computed: publish before the next step releases
    assert m.resize(h, tokens.size, tokens.size)
    m.commit(h, tokens.size)
    return h, reused


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n).astype(np.int32)


def test_reuse_after_the_donor_closed_and_scope_isolation() -> None:
    m, e = setup((FULL,))
    t = tokens(23)
    a, reused = run(m, e, t)
    assert reused == 0
    m.close(a)  # published pages survive
    m.check_invariants()
    assert m.prefix is not None and m.prefix.probe(t) == 20  # 5 full blocks; 1 token left to compute
    assert m.prefix.probe(np.concatenate([t[:9], t[9:] + 1])) == 8  # diverges inside block 2
    other = KVCacheManager(m.plan, ManagerConfig(max_active_requests=8))
    other.enable_prefix_cache(ReuseScope(cache_salt="tenant-b"))
    assert other.prefix is not None and other.prefix.probe(t) == 0


def test_reused_pages_are_shared_and_never_written() -> None:
    m, e = setup((FULL,))
    t = tokens(30)
    a, _ = run(m, e, t[:17])  # 4 full blocks published
    opened = e.open_with_prefix(t)
    assert opened is not None and opened[1] == 16
    b = opened[0]
    e.verify()
    ta, tb = (m.rows.tables[0][m.row_of([h])[0]] for h in (a, b))
    assert tb[:4].tolist() == ta[:4].tolist()
    assert m.tiers.allocators[GPU][0].references(ta[:4]).tolist() == [3, 3, 3, 3]  # a, b, the cache
    assert e.step([b], [30], [16])
    m.check_invariants()
    e.verify()  # a's pages still hold a's tags: b wrote only its own blocks


def test_window_groups_need_only_their_window() -> None:
    m, e = setup((FULL, WINDOW))
    t = tokens(41)
    a, _ = run(m, e, t)
    m.close(a)
    opened = e.open_with_prefix(t)
    assert opened is not None
    b, reused = opened
    assert reused == 40
    e.verify()
    # window 6 + 2 sinks at history 40: sink block 0 and blocks 8, 9 are all the window group needs
    assert m.rows.pages(m.row_of([b])[0], 1)[0].tolist() == [0, 8, 9]
    m.check_invariants()


def test_ssm_needs_a_snapshot_at_the_match_point() -> None:
    m, e = setup((FULL, ssm_layer(4, 4, 2, 4)))
    t = tokens(20)
    a, _ = run(m, e, t[:16])  # computed 16: a snapshot at 16
    assert m.prefix is not None
    assert m.prefix.probe(t) == 16
    assert m.prefix.probe(t[:13]) == 0  # a prefix of 12 has full blocks but no state at 12
    opened = e.open_with_prefix(t)
    assert opened is not None and opened[1] == 16
    m.check_invariants()
    e.verify()  # the new cache's own state is a copy of a's snapshot
    assert e.step([a, opened[0]], [17, 17], [16, 16])
    e.verify()


def test_pinned_pages_go_to_the_host_then_come_back() -> None:
    m, e = setup((FULL,), gpu_slots=12, host_slots=12)
    t = tokens(33)
    a, _ = run(m, e, t)  # 9 blocks, 8 full ones published
    m.close(a)
    assert m.stats().pool(0).in_use == 8 and m.prefix is not None and m.prefix.reclaimable() == [8]
    b = m.open()
    assert b is not None and e.step([b], [40], [0])  # needs 10 slots: the cache moves 6 pages to the host
    m.check_invariants()
    assert m.prefix.stats.offloaded_pages == 6
    m.close(b)
    e.forget(b)
    opened = e.open_with_prefix(t)
    assert opened is not None and opened[1] == 32
    assert m.prefix.stats.hit_tokens == {"gpu": [8], "host": [24], "disk": [0]}
    m.check_invariants()
    e.verify()


def test_open_without_room_changes_nothing() -> None:
    m, e = setup((FULL,), gpu_slots=9, host_slots=9)
    t = tokens(33)
    a, _ = run(m, e, t)
    m.close(a)
    b = m.open()
    assert b is not None and e.step([b], [36], [0])  # 9 slots: every cached page went to the host
    assert m.prefix is not None
    before = snapshot(m)
    assert m.prefix.open(t) is None  # the host pages cannot come back: no GPU slot
    assert snapshot(m) == before


@pytest.mark.parametrize("seed", range(6))
def test_random_reuse_reads_what_the_donors_wrote(seed: int) -> None:
    """Random prompts drawn from a few shared stems, opened through the cache, extended, published,
    closed, under memory pressure (pinned pages offloaded and dropped): after every operation the
    invariants hold and every cache reads exactly what its writers wrote."""
    rng = np.random.default_rng(seed)
    layers = (FULL, WINDOW, attention_layer(1, 8, 2, Chunked(12)))
    m, e = setup(layers, gpu_slots=40, host_slots=int(rng.integers(0, 30)))
    stems = [tokens(80, seed * 10 + i) for i in range(3)]
    live: list[int] = []
    for _ in range(60):
        if live and rng.random() < 0.4:
            h = live.pop(int(rng.integers(len(live))))
            m.close(h)
            e.forget(h)
        else:
            stem = stems[int(rng.integers(len(stems)))]
            cut = int(rng.integers(5, 40))
            prompt = np.concatenate([stem[:cut], tokens(int(rng.integers(1, 9)), int(rng.integers(1 << 30)))])
            opened = e.open_with_prefix(prompt)
            if opened is None:
                continue
            h, reused = opened
            assert reused % TPB == 0 and reused < prompt.size
            if not e.step([h], [prompt.size], [reused]):
                m.close(h)
                e.forget(h)
                continue
            e.publish(h, prompt, prompt.size)
            live.append(h)
        m.check_invariants()
        e.verify()


def test_kv_events_through_the_manager() -> None:
    from hybridkv.reuse import BlockRemoved, BlockStored, EventQueue

    layers = (FULL,)
    slot = 2 * 8 * 2 * TPB
    p = plan(PlanSpec(ModelLayout("t", layers), 12 * slot, 48, tokens_per_block=TPB, max_batch_size=2))
    m = KVCacheManager(p, ManagerConfig(max_active_requests=4))
    queue = EventQueue(100)
    m.enable_prefix_cache(events=queue)
    e = FakeEngine(m)
    t = tokens(13)
    a, _ = run(m, e, t)
    stored = [ev for ev in queue.drain().events if isinstance(ev, BlockStored)]
    assert len(stored) == 1 and len(stored[0].keys) == 3 and stored[0].tier == GPU
    assert [list(row) for row in stored[0].token_ids] == [t[i:i + 4].tolist() for i in (0, 4, 8)]
    m.close(a)
    b = m.open()
    assert b is not None and e.step([b], [48], [0])  # needs all 12 slots: the cache drops its 3 pages
    removed = [ev for ev in queue.drain().events if isinstance(ev, BlockRemoved)]
    assert sum(len(ev.keys) for ev in removed) == 3
    m.check_invariants()


def test_eviction_takes_cache_only_pages_in_the_index_order() -> None:
    """The incremental heaps give the same victims as sorting every cache-only entry (the
    index's ``evictable`` order filtered by 'only the cache holds the page')."""
    m, e = setup((FULL, WINDOW), gpu_slots=120)
    handles = [run(m, e, tokens(18 + 3 * i, seed=i))[0] for i in range(6)]
    for h in handles[:4]:
        m.close(h)  # their pages are now the cache's alone; handles 4, 5 still hold theirs
    assert m.prefix is not None
    again = e.open_with_prefix(tokens(18, seed=0))  # a hit on request 0 touches its entries
    assert again is not None
    m.close(again[0])
    m.check_invariants()
    gpu = m.tiers.allocators[GPU]
    pool_of = [lg.pool_group for lg in m.grouped.layer_groups]
    expected = [(int(x.layer_group), int(x.ordinal), x.key) for x in m.prefix.index.evictable(GPU)
                if gpu[pool_of[x.layer_group]].references([x.slot])[0] == 1]
    assert len(expected) == sum(m.prefix.reclaimable()) > 10
    before = {(int(x.layer_group), x.key) for x in m.prefix.index.entries()}
    k = 7
    freed = m.prefix.evict([k] * len(m.grouped.pool_groups))
    after = {(int(x.layer_group), x.key) for x in m.prefix.index.entries()}
    gone = before - after
    for pg in range(len(m.grouped.pool_groups)):
        mine = [(g, key) for g, _, key in expected if pool_of[g] == pg][:k]
        assert freed[pg] == len(mine)
        assert {x for x in gone if pool_of[x[0]] == pg} == set(mine)
    m.check_invariants()
    e.verify()


def test_reclaimable_is_exact_after_every_operation_with_a_host_tier() -> None:
    """``reclaimable`` (O(1) counters) equals a recount over the index after every step."""
    m, e = setup((FULL, WINDOW), gpu_slots=40, host_slots=12)
    assert m.prefix is not None
    gpu = m.tiers.allocators[GPU]
    pool_of = [lg.pool_group for lg in m.grouped.layer_groups]
    for i in range(12):
        h, _ = run(m, e, tokens(20 + i, seed=i % 4))
        if i % 3:
            m.close(h)
        else:
            m.suspend(h)
        recount = [0] * len(m.grouped.pool_groups)
        groups, slots = m.prefix.index.located(GPU)
        for g, s in zip(groups.tolist(), slots.tolist(), strict=True):
            recount[pool_of[g]] += int(gpu[pool_of[g]].references([s])[0] == 1)
        assert m.prefix.reclaimable() == recount
        m.check_invariants()
        e.verify()


def test_suspended_cache_takes_the_host_room_of_cached_pages_nobody_uses() -> None:
    """The host tier full of offloaded cached pages still takes a suspended request: its pages
    are worth more than a prefix nobody uses, which is dropped (eviction order) to make room."""
    m, e = setup((FULL,), gpu_slots=12, host_slots=6)
    assert m.prefix is not None
    for seed in range(4):  # 4 x 5 published pages through a 12-slot GPU: the host fills with cached pages
        h, _ = run(m, e, tokens(22, seed=seed))
        m.close(h)
    host = m.tiers.allocators[HOST][0]
    assert host.num_free == 0 and m.prefix.cached_room(HOST) == [6]
    s = e.open_with_prefix(tokens(17, seed=99))
    assert s is not None
    assert e.step([s[0]], [17], [0])
    m.suspend(s[0])
    before = len(m.prefix.index)
    assert m.offload(s[0], HOST)  # 5 pages: 5 cached host pages dropped
    assert m.suspended[s[0]].tier == HOST and len(m.prefix.index) == before - 5
    assert host.num_free == 0 and m.prefix.cached_room(HOST) == [1]
    m.check_invariants()
    e.verify()
    assert m.resume(s[0])
    e.verify()
