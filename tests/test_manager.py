"""KVCacheManager on small hand-built layouts: exact slot ids, window / sink / chunk release,
atomic refusals, misuse, tiers and eviction, stats, and the tables a step hands the engine.

Layouts use ``attention_layer(1, 8, 1, lc)``: K and V of 8 B per token each, so one slot is
``16 * tokens_per_block`` bytes (64 B at tpb 4), and the fake engine's 8-byte tags fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import DISK, HOST, snapshot
from hybridkv.core.errors import ConfigError, UsageError
from hybridkv.core.types import GPU
from hybridkv.engine.fake import FakeEngine
from hybridkv.layouts.spec import LayerSpec, ModelLayout, attention_layer, ssm_layer
from hybridkv.lifecycles import Chunked, Full, Sliding, Ssm, live_blocks, worst_decode_blocks
from hybridkv.manager.counters import Counters
from hybridkv.manager.manager import KVCacheManager, ManagerConfig
from hybridkv.manager.state import CacheLengths, RequestState
from hybridkv.manager.stats import PoolTierStats
from hybridkv.manager.tiers import StorageConfig
from hybridkv.planning.planner import PlanSpec, plan

NULL = -1
FULL = Full()
W8 = Sliding(8)
W8_SINK4 = Sliding(8, 4)
SSM = ssm_layer(8, 8, 1, 1)  # two 8 B states: 16 B slots
# pool group 0: full + window 8 (64 B slots at tpb 4); pool group 1: ssm (16 B slots)
MIX = (attention_layer(1, 8, 1, FULL), attention_layer(1, 8, 1, W8), SSM)
MIX_SLOTS = (11, 2)  # floors at max_seq_len 32, batch 2: one request 8 + 3 blocks; 2 ssm states
MIX_BYTES = 11 * 64 + 2 * 16


def build(layers: tuple[LayerSpec, ...], gpu_bytes: int, max_seq_len: int = 32, tpb: int = 4, *,
          batch: int = 1, host_bytes: int = 0, max_active: int = 8, **storage: Any) -> KVCacheManager:
    p = plan(PlanSpec(ModelLayout("test", layers), gpu_bytes, max_seq_len, tokens_per_block=tpb,
                      max_batch_size=batch, host_bytes=host_bytes))
    return KVCacheManager(p, ManagerConfig(max_active_requests=max_active, storage=StorageConfig.local(**storage)))


@pytest.fixture
def managers(tmp_path: Path) -> Iterator[Callable[..., KVCacheManager]]:
    """``build`` with the disk tier in tmp_path; closes storage (removing disk files) at the end."""
    made: list[KVCacheManager] = []

    def make(*args: Any, **kwargs: Any) -> KVCacheManager:
        kwargs.setdefault("disk_directory", str(tmp_path))
        m = build(*args, **kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close_storage()
    assert list(tmp_path.iterdir()) == []


def row(m: KVCacheManager, handle: int, layer_group: int) -> list[int]:
    """An active request's table entries over its capacity (one entry for SSM)."""
    r = int(m.row_of([handle])[0])
    width = 1 if isinstance(m.grouped.layer_groups[layer_group].life_cycle, Ssm) else \
        -(-int(m.rows.capacity[r]) // m.tokens_per_block)
    return m.rows.tables[layer_group][r, :width].tolist()


def gpu_in_use(m: KVCacheManager) -> list[int]:
    return [a.num_in_use for a in m.tiers.allocators[GPU]]


def ok(fake: FakeEngine, handles: list[int], capacity: list[int], history: list[int]) -> None:
    """A step that must succeed, checked from every angle."""
    assert fake.step(handles, capacity, history)
    fake.m.check_invariants()
    fake.verify()


# ---- exact slot ids ----------------------------------------------------------------------


def test_plan_of_the_mix_layout_is_its_floors(managers: Callable[..., KVCacheManager]) -> None:
    m = managers(MIX, MIX_BYTES, batch=2)
    assert m.plan.slots == MIX_SLOTS
    assert [a.num_slots for a in m.tiers.allocators[HOST]] == [0, 0]
    assert [a.num_slots for a in m.tiers.allocators[DISK]] == [0, 0]
    assert m.tiers.buffers[HOST] == [None, None]


def test_prefill_and_decodes_exact_ids_then_refusal_then_lifo_reuse(
        managers: Callable[..., KVCacheManager]) -> None:
    m = managers(MIX, MIX_BYTES, batch=2)
    fake = FakeEngine(m)
    a, b = m.open(), m.open()
    assert (a, b) == (0, 1) and m.active_handles().tolist() == [0, 1]
    assert row(m, a, 0) == [] and row(m, a, 2) == [NULL]  # empty: no pages anywhere
    ok(fake, [a, b], [6, 3], [0, 0])  # prefills: blocks in batch order, layer group by layer group
    assert (row(m, a, 0), row(m, b, 0)) == ([0, 1], [2])
    assert (row(m, a, 1), row(m, b, 1)) == ([3, 4], [5])
    assert (row(m, a, 2), row(m, b, 2)) == ([0], [1])
    ok(fake, [a, b], [7, 4], [6, 3])  # no block boundary crossed: nothing moves
    assert (row(m, a, 0), row(m, b, 0), row(m, a, 1), row(m, b, 1)) == ([0, 1], [2], [3, 4], [5])
    ok(fake, [a, b], [8, 5], [7, 4])
    assert (row(m, b, 0), row(m, b, 1)) == ([2, 6], [5, 7])
    ok(fake, [a, b], [9, 6], [8, 5])
    assert (row(m, a, 0), row(m, a, 1)) == ([0, 1, 8], [3, 4, 9])
    ok(fake, [a, b], [10, 7], [9, 6])
    ok(fake, [a, b], [11, 8], [10, 7])
    assert gpu_in_use(m) == [10, 2]
    # history 11 in window 8: tokens [0, 4) are stale, block 0 (slot 3) goes back first, so
    # b's new full-attention block reuses it and its window block takes the last fresh slot
    ok(fake, [a, b], [12, 9], [11, 8])
    assert row(m, a, 1) == [NULL, 4, 9]
    assert (row(m, b, 0), row(m, b, 1)) == ([2, 6, 3], [5, 7, 10])
    assert gpu_in_use(m) == [11, 2]
    # a's next block needs 2 slots in pool group 0 (full + window), none free, nothing to evict
    before = snapshot(m)
    assert m.step([a, b], [13, 10], [12, 9]) is None
    assert fake.step([a, b], [13, 10], [12, 9]) is False
    assert snapshot(m) == before
    m.check_invariants()
    fake.verify()
    # closing b frees [2, 6, 3] then [5, 7, 10]: a's block 3 pops 10 (full) and 7 (window)
    m.close(b)
    fake.forget(b)
    assert gpu_in_use(m) == [5, 1]
    ok(fake, [a], [13], [12])
    assert (row(m, a, 0), row(m, a, 1), row(m, a, 2)) == ([0, 1, 8, 10], [NULL, 4, 9, 7], [0])


def test_sink_block_is_never_released_and_window_slots_cycle(managers: Callable[..., KVCacheManager]) -> None:
    # window 8 + 4 sinks, tpb 4: block 0 holds the sinks; block b >= 1 is stale once
    # keep_start(h) = h - 7 reaches its end, i.e. from history 4 * b + 11 on
    m = managers((attention_layer(1, 8, 1, W8_SINK4),), 8 * 64, max_seq_len=64)
    fake = FakeEngine(m)
    h = m.open()
    ok(fake, [h], [5], [0])
    assert row(m, h, 0) == [0, 1]
    alloc = m.tiers.allocators[GPU][0]
    expected_release = {15: 1, 19: 2, 23: 3}  # history -> slot released at that step
    for hist in range(5, 64):
        before = set(np.flatnonzero(alloc.is_allocated(np.arange(alloc.num_slots))).tolist())
        ok(fake, [h], [hist + 1], [hist])
        t = row(m, h, 0)
        assert t[0] == 0  # the sink block keeps its slot for the whole run
        stop = max(1, (hist - 7) // 4)
        assert t[1:stop] == [NULL] * (stop - 1)
        assert NULL not in t[stop:]
        after = set(np.flatnonzero(alloc.is_allocated(np.arange(alloc.num_slots))).tolist())
        if hist in expected_release:
            assert before - after == {expected_release[hist]}
        assert alloc.num_in_use == int(live_blocks(W8_SINK4, hist + 1, hist, 4)) <= 4
    # blocks 4, 5, 6, ... reuse slots 1, 2, 3, 1, ... (each freed one step before it is needed)
    assert row(m, h, 0) == [0] + [NULL] * 13 + [2, 3]
    assert alloc.peak_in_use == 4 == worst_decode_blocks((W8_SINK4,), 4, 64)


def test_chunked_blocks_go_back_at_chunk_boundaries(managers: Callable[..., KVCacheManager]) -> None:
    chunk8 = Chunked(8)
    m = managers((attention_layer(1, 8, 1, chunk8),), 8 * 64, max_seq_len=64)
    fake = FakeEngine(m)
    h = m.open()
    ok(fake, [h], [6], [0])
    assert row(m, h, 0) == [0, 1]
    alloc = m.tiers.allocators[GPU][0]
    in_use = {}
    for hist in range(6, 21):
        ok(fake, [h], [hist + 1], [hist])
        in_use[hist] = alloc.num_in_use
        if hist == 8:  # chunk [0, 8) done: blocks 0, 1 freed (0 then 1), block 2 pops 1
            assert row(m, h, 0) == [NULL, NULL, 1]
        if hist == 12:
            assert row(m, h, 0) == [NULL, NULL, 1, 0]
        if hist == 16:  # chunk [8, 16) done: blocks 2, 3 freed (1 then 0), block 4 pops 0
            assert row(m, h, 0) == [NULL, NULL, NULL, NULL, 0]
    assert row(m, h, 0) == [NULL, NULL, NULL, NULL, 0, 1]
    assert in_use == {6: 2, 7: 2, 8: 1, 9: 1, 10: 1, 11: 1, 12: 2, 13: 2, 14: 2, 15: 2,
                      16: 1, 17: 1, 18: 1, 19: 1, 20: 2}


def test_ssm_holds_one_slot_per_request_with_tokens(managers: Callable[..., KVCacheManager]) -> None:
    m = managers((SSM,), 4 * 16, max_seq_len=64, batch=3)
    assert m.plan.slots == (4,)
    fake = FakeEngine(m)
    h = [m.open() for _ in range(3)]
    ok(fake, h[:2], [5, 1], [0, 0])
    assert [row(m, x, 0) for x in h] == [[0], [1], [NULL]]
    ok(fake, h, [6, 17, 0], [5, 1, 0])  # a capacity-0 request holds nothing
    assert [row(m, x, 0) for x in h] == [[0], [1], [NULL]]
    ok(fake, h, [7, 18, 3], [6, 17, 0])
    for step in range(20):
        ok(fake, h, [8 + step, 19 + step, 4 + step], [7 + step, 18 + step, 3 + step])
    assert [row(m, x, 0) for x in h] == [[0], [1], [2]]
    assert m.tiers.allocators[GPU][0].num_in_use == 3
    m.close(h[1])
    assert m.tiers.allocators[GPU][0].num_in_use == 2


def test_capacity_shrinks_back_to_history_and_frees_the_tail(managers: Callable[..., KVCacheManager]) -> None:
    m = managers(MIX, MIX_BYTES, batch=2)
    fake = FakeEngine(m)
    h = m.open()
    ok(fake, [h], [12], [0])  # reserve 3 blocks
    assert (row(m, h, 0), row(m, h, 1)) == ([0, 1, 2], [3, 4, 5])
    ok(fake, [h], [5], [5])  # only 5 tokens were computed: block 2 of each group goes back
    assert (row(m, h, 0), row(m, h, 1), gpu_in_use(m)) == ([0, 1], [3, 4], [4, 1])
    assert m.resize(h, 9)
    assert (row(m, h, 0), row(m, h, 1)) == ([0, 1, 5], [3, 4, 2])
    assert m.lengths(h) == CacheLengths(9, 5, 0)


# ---- atomicity: None / False leave every byte as it was ------------------------------------


def fill_mix(m: KVCacheManager, fake: FakeEngine) -> tuple[int, int]:
    """a: 12 tokens (window block 0 released), b: 9 tokens; pool group 0 full (11 / 11)."""
    a, b = m.open(), m.open()
    ok(fake, [a, b], [11, 5], [0, 0])
    ok(fake, [a, b], [12, 9], [11, 5])
    assert gpu_in_use(m) == [11, 2]
    return a, b


def test_step_short_of_pages_with_an_unhelpful_suspended_cache(managers: Callable[..., KVCacheManager]) -> None:
    m = managers(MIX, MIX_BYTES, batch=2, host_bytes=MIX_BYTES)
    fake = FakeEngine(m)
    a, b = fill_mix(m, fake)
    m.suspend(b)  # b holds 6 slots of pool 0 and could move to the host...
    before = snapshot(m)
    # ...but a prefill to 32 tokens needs 5 more blocks in each of its 2 layer groups: 10 > 6
    assert m.step([a], [32], [12]) is None
    assert snapshot(m) == before
    assert m.suspended[b].tier == GPU
    m.check_invariants()
    fake.verify()


def test_step_short_of_pages_with_no_lower_tier(managers: Callable[..., KVCacheManager]) -> None:
    m = managers(MIX, MIX_BYTES, batch=2)  # no host, no disk: a suspended cache cannot move
    fake = FakeEngine(m)
    a, b = fill_mix(m, fake)
    m.suspend(b)
    before = snapshot(m)
    assert m.step([a], [13], [12]) is None
    assert snapshot(m) == before
    before = snapshot(m)
    assert not m.resize(a, 13)
    assert snapshot(m) == before
    assert m.offload(b, HOST) is False and m.offload(b, DISK) is False
    assert snapshot(m) == before
    m.check_invariants()


def test_open_and_resume_without_a_free_row(managers: Callable[..., KVCacheManager]) -> None:
    m = managers(MIX, MIX_BYTES, batch=2, max_active=1)
    fake = FakeEngine(m)
    a = m.open()
    ok(fake, [a], [3], [0])
    b = m.create()
    before = snapshot(m)
    assert m.open() is None  # no handle was taken either
    assert m.resume(b) is False
    assert snapshot(m) == before
    m.suspend(a)
    assert m.resume(b) is True
    assert m.active_handles().tolist() == [b]
    assert m.open() is None
    assert m.create() == 2


def test_resume_from_host_without_room_changes_nothing(managers: Callable[..., KVCacheManager]) -> None:
    m = managers(MIX, MIX_BYTES, batch=2, host_bytes=MIX_BYTES)
    fake = FakeEngine(m)
    a, b = fill_mix(m, fake)
    m.suspend(b)
    assert m.offload(b, HOST)
    ok(fake, [a], [24], [12])  # a takes the room b left: 3 more blocks in 2 layer groups
    before = snapshot(m)
    assert m.resume(b) is False
    assert m.offload(b, DISK) is False  # no disk tier
    assert snapshot(m) == before
    m.check_invariants()
    fake.verify()


def test_offload_without_room_changes_nothing(managers: Callable[..., KVCacheManager]) -> None:
    # host slots: 335 * 11 // 736 = 5 in pool group 0, 335 * 2 // 736 = 0 for the ssm
    m = managers(MIX, MIX_BYTES, batch=2, host_bytes=335, disk_bytes=MIX_BYTES)
    assert [a.num_slots for a in m.tiers.allocators[HOST]] == [5, 0]
    assert [a.num_slots for a in m.tiers.allocators[DISK]] == [11, 2]
    fake = FakeEngine(m)
    a, b = fill_mix(m, fake)
    m.suspend(b)
    m.suspend(a)
    before = snapshot(m)
    assert m.offload(a, HOST) is False  # 5 pool-0 slots, but no ssm slot on the host
    assert snapshot(m) == before
    assert m.offload(a, DISK) is True
    assert m.offload(b, DISK) is True
    assert m.offload(a, DISK) is True  # already there: nothing to do
    m.check_invariants()
    fake.verify()


# ---- misuse: UsageError and nothing changed ----------------------------------------------


@pytest.fixture
def misuse(managers: Callable[..., KVCacheManager]) -> tuple[KVCacheManager, dict[str, int]]:
    """active a (capacity 10, history 6, committed 2) and d (4, 4), suspended b, closed c."""
    m = managers(MIX, 16 * 64 + 4 * 16, batch=4, max_active=4)
    fake = FakeEngine(m)
    a, b, c, d = m.open(), m.open(), m.open(), m.open()
    ok(fake, [a, b, c, d], [6, 3, 2, 4], [0, 0, 0, 0])
    ok(fake, [a], [10], [6])
    m.commit(a, 2)
    m.suspend(b)
    m.close(c)
    fake.forget(c)
    return m, {"a": a, "b": b, "c": c, "d": d}


MISUSE: dict[str, tuple[Callable[[KVCacheManager, dict[str, int]], Any], str]] = {
    "step suspended": (lambda m, h: m.step([h["b"]], [4], [3]), "not active"),
    "step closed": (lambda m, h: m.step([h["c"]], [2], [2]), "not active"),
    "step unknown": (lambda m, h: m.step([99], [1], [0]), "unknown request handle"),
    "step negative handle": (lambda m, h: m.step([-1], [1], [0]), "unknown request handle"),
    "step one bad handle in a batch": (lambda m, h: m.step([h["a"], h["b"]], [11, 4], [10, 3]), "not active"),
    "duplicate handle": (lambda m, h: m.step([h["a"], h["d"], h["a"]], [10, 5, 11], [6, 4, 10]), "twice"),
    "history moves back": (lambda m, h: m.step([h["a"]], [10], [5]), "history cannot move back"),
    "history beyond old capacity": (lambda m, h: m.step([h["d"], h["a"]], [5, 12], [4, 11]), "old capacity"),
    "capacity below history": (lambda m, h: m.step([h["a"]], [7], [8]), "capacity must be >= history"),
    "capacity beyond max_seq_len": (lambda m, h: m.step([h["a"]], [33], [10]), "exceeds max_seq_len"),
    "lengths differ": (lambda m, h: m.step([h["a"]], [10, 11], [6]), "1 handles, 2 capacities"),
    "resize suspended": (lambda m, h: m.resize(h["b"], 5), "not active"),
    "commit beyond history": (lambda m, h: m.commit(h["a"], 7), "tokens <= history 6"),
    "commit backwards": (lambda m, h: m.commit(h["a"], 1), "need committed 2"),
    "commit closed": (lambda m, h: m.commit(h["c"], 0), "closed"),
    "resume active": (lambda m, h: m.resume(h["a"]), "cannot resume request 0: it is active"),
    "resume closed": (lambda m, h: m.resume(h["c"]), "it is closed"),
    "suspend suspended": (lambda m, h: m.suspend(h["b"]), "cannot suspend request 1: it is suspended"),
    "suspend closed": (lambda m, h: m.suspend(h["c"]), "it is closed"),
    "close twice": (lambda m, h: m.close(h["c"]), "cannot close request 2: it is closed"),
    "offload active": (lambda m, h: m.offload(h["a"], HOST), "only suspended caches move"),
    "offload closed": (lambda m, h: m.offload(h["c"], HOST), "only suspended caches move"),
    "lengths closed": (lambda m, h: m.lengths(h["c"]), "closed"),
    "state unknown": (lambda m, h: m.state(4), "unknown request handle 4"),
    "row_of suspended": (lambda m, h: m.row_of([h["a"], h["b"]]), r"\[1\] are not active"),
}


@pytest.mark.parametrize("case", sorted(MISUSE))
def test_misuse_raises_and_changes_nothing(case: str, misuse: tuple[KVCacheManager, dict[str, int]]) -> None:
    m, handles = misuse
    call, message = MISUSE[case]
    before = snapshot(m)
    with pytest.raises(UsageError, match=message):
        call(m, handles)
    assert snapshot(m) == before
    m.check_invariants()


def test_misuse_fixture_is_what_it_says(misuse: tuple[KVCacheManager, dict[str, int]]) -> None:
    m, h = misuse
    assert [m.state(h[k]) for k in "abcd"] == [RequestState.ACTIVE, RequestState.SUSPENDED,
                                               RequestState.CLOSED, RequestState.ACTIVE]
    assert m.lengths(h["a"]) == CacheLengths(10, 6, 2)
    assert m.lengths(h["b"]) == CacheLengths(3, 0, 0)
    m.commit(h["b"], 0)  # a suspended cache may commit
    m.commit(h["a"], 6)
    assert m.lengths(h["a"]).committed == 6


def test_handle_index_grows_past_its_first_allocation(managers: Callable[..., KVCacheManager]) -> None:
    m = managers(MIX, MIX_BYTES, batch=2)
    assert [m.create() for _ in range(1500)] == list(range(1500))  # the index starts at 1024
    assert m.resume(1499) and m.step([1499], [3], [0]) is not None
    m.close(1000)
    assert [m.state(h) for h in (0, 1000, 1499)] == [RequestState.SUSPENDED, RequestState.CLOSED,
                                                    RequestState.ACTIVE]
    assert m.active_handles().tolist() == [1499] and len(m.suspended) == 1498
    m.check_invariants()
    with pytest.raises(UsageError, match="unknown request handle 1500"):
        m.state(1500)


def test_bookkeeping_only_manager_has_no_buffers() -> None:
    m = build(MIX, MIX_BYTES, batch=2, host_bytes=MIX_BYTES, disk_bytes=MIX_BYTES, with_data=False)
    assert all(b is None for t in m.tiers.ids for b in m.tiers.buffers[t])
    h = m.open()
    assert m.step([h], [12], [0]) is not None
    m.suspend(h)
    assert m.offload(h, DISK) and m.resume(h)
    assert m.counters.offload_bytes == m.counters.onboard_bytes == 6 * 64 + 16
    m.check_invariants()
    with pytest.raises(ConfigError, match="with_data=True"):
        FakeEngine(m).verify()


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="max_active_requests must be >= 1"):
        ManagerConfig(max_active_requests=0)
    with pytest.raises(ConfigError, match="unknown eviction_policy 'fifo'"):
        ManagerConfig(eviction_policy="fifo")
    with pytest.raises(ConfigError, match="bytes must be >= 0"):
        StorageConfig.local(disk_bytes=-1)


# ---- long runs: windows stay bounded -------------------------------------------------------


def test_window_decode_to_100k_tokens_never_exceeds_worst_case_bookkeeping_only() -> None:
    lcs = (Sliding(128), Sliding(128, 4))  # two layer groups, one pool group
    m = build(tuple(attention_layer(1, 8, 1, lc) for lc in lcs), 10**6, max_seq_len=100_000, tpb=16,
              with_data=False)
    assert m.tiers.buffers[GPU] == [None]
    worst_each = [worst_decode_blocks((lc,), 16, 100_000) for lc in lcs]
    worst = worst_decode_blocks(lcs, 16, 100_000)
    assert (worst_each, worst) == ([9, 10], 19)  # ceil(127 / 16) + 1, plus one sink block
    alloc = m.tiers.allocators[GPU][0]
    h = m.open()
    handles, cap, hist = np.array([h]), np.zeros(1, np.int64), np.zeros(1, np.int64)
    for pos in range(100_000):
        cap[0], hist[0] = pos + 1, pos
        assert m.step(handles, cap, hist) is not None
        assert alloc.num_in_use <= worst
        if pos % 997 == 0:
            assert all(len(m.rows.pages(0, g)[0]) <= worst_each[g] for g in range(2))
            m.check_invariants()
    m.check_invariants()
    assert alloc.peak_in_use == worst
    # at history 99999 the window keeps tokens [99872, 100000): blocks 6242..6249
    assert m.rows.pages(0, 0)[0].tolist() == list(range(6242, 6250))
    assert m.rows.pages(0, 1)[0].tolist() == [0, *range(6242, 6250)]
    assert m.counters.steps == 100_000


def test_window_decode_with_data_verifies_every_step() -> None:
    w128, w128s = Sliding(128), Sliding(128, 4)
    layers = (attention_layer(1, 8, 1, FULL), attention_layer(1, 8, 1, w128),
              attention_layer(2, 8, 1, w128s), attention_layer(1, 8, 1, Chunked(100)), SSM)
    m = build(layers, 10**6, max_seq_len=3000, tpb=16)
    fake = FakeEngine(m)
    worst = [worst_decode_blocks((lg.life_cycle,), 16, 3000) for lg in m.grouped.layer_groups]
    h = m.open()
    ok(fake, [h], [40], [0])
    for pos in range(40, 3000):
        assert fake.step([h], [pos + 1], [pos])
        fake.verify()
        assert all(len(m.rows.pages(0, g)[0]) <= w for g, w in enumerate(worst))
        if pos % 101 == 0:
            m.check_invariants()
    m.check_invariants()
    # words checked (K and V per position): full 3000; window blocks 179..187 (positions
    # 2864..2999: 136); the same plus the sink block (16); chunk blocks 181.. (2896..2999: 104); ssm
    assert fake.verify() == 2 * (3000 + 136 + 152 + 104) + 2


# ---- tiers: suspend, offload, resume, eviction ---------------------------------------------


def test_suspend_to_host_and_disk_and_back_with_data_intact(managers: Callable[..., KVCacheManager]) -> None:
    m = managers(MIX, MIX_BYTES, batch=2, host_bytes=MIX_BYTES, disk_bytes=MIX_BYTES)
    assert [a.num_slots for t in m.tiers.ids for a in m.tiers.allocators[t]] == [11, 2] * 3
    fake = FakeEngine(m)
    a, b = m.open(), m.open()
    ok(fake, [a], [10], [0])
    for hist in range(10, 14):
        ok(fake, [a], [hist + 1], [hist])
    assert (row(m, a, 0), row(m, a, 1), row(m, a, 2)) == ([0, 1, 2, 3], [NULL, 4, 5, 6], [0])
    ok(fake, [b], [5], [0])
    assert (row(m, b, 0), row(m, b, 1)) == ([7, 8], [9, 10])
    m.suspend(a)
    s = m.stats()
    assert (s.pool(0).in_use, s.pool(0).evictable, s.pool(1).in_use, s.pool(1).evictable) == (11, 7, 2, 1)
    assert m.offload(a, HOST)
    fake.verify()
    m.check_invariants()
    s = m.stats()
    assert (s.pool(0).in_use, s.pool(1).in_use) == (11 - 7, 2 - 1)  # a's GPU pages are free
    assert (s.pool(0, HOST).in_use, s.pool(1, HOST).in_use) == (7, 1)
    assert (s.pool(0, HOST).evictable, s.pool(0).evictable) == (7, 0)
    assert m.suspended[a].slots[0].tolist() == [0, 1, 2, 3] and m.suspended[a].slots[1].tolist() == [4, 5, 6]
    assert m.suspended[a].ordinals[1].tolist() == [1, 2, 3]
    assert m.offload(a, DISK)
    fake.verify()
    m.check_invariants()
    s = m.stats()
    assert (s.pool(0, HOST).in_use, s.pool(0, DISK).in_use, s.pool(1, DISK).in_use) == (0, 7, 1)
    assert s.counters == Counters(steps=6, suspends=1, resumes=2, offloads=2, offload_bytes=2 * (7 * 64 + 16))
    ok(fake, [b], [20], [5])  # b grows into a's old GPU slots: 3 + 3 more blocks
    before = snapshot(m)
    assert m.resume(a) is False  # 7 pages wanted, 1 free, b is active
    assert snapshot(m) == before
    m.suspend(b)
    assert m.resume(a) is True  # b (10 + 1 pages) goes to the host, a comes up from disk
    fake.verify()
    m.check_invariants()
    assert m.suspended[b].tier == HOST
    s = m.stats()
    assert s.counters == Counters(steps=7, suspends=2, resumes=3, evictions=1, offloads=3, onboards=1,
                                  offload_bytes=2 * (7 * 64 + 16) + 10 * 64 + 16, onboard_bytes=7 * 64 + 16)
    assert (s.pool(0).in_use, s.pool(0, DISK).in_use, s.pool(0, HOST).in_use) == (7, 0, 10)
    assert m.lengths(a) == CacheLengths(14, 13, 0)
    for hist in range(14, 20):  # a carries on where it left off, released window block included
        ok(fake, [a], [hist + 1], [hist])
    assert row(m, a, 1)[:2] == [NULL, NULL]
    m.close(a)
    fake.forget(a)
    assert m.resume(b) is True
    fake.verify()
    ok(fake, [b], [21], [20])
    m.check_invariants()


def test_eviction_order_is_priority_then_lru_then_handle(managers: Callable[..., KVCacheManager]) -> None:
    # one pool group of 64 B slots: 12 on the GPU, 3 on the host, 4 on disk
    m = managers((attention_layer(1, 8, 1, FULL),), 12 * 64, host_bytes=3 * 64, disk_bytes=4 * 64)
    assert [[a.num_slots for a in m.tiers.allocators[t]] for t in m.tiers.ids] == [[12], [3], [4]]
    fake = FakeEngine(m)
    v0 = m.open(priority=1)
    v1, v2, act = m.open(), m.open(), m.open()
    ok(fake, [v0, v1, v2, act], [8, 8, 12, 20], [0, 0, 0, 0])
    assert [row(m, x, 0) for x in (v0, v1, v2, act)] == [[0, 1], [2, 3], [4, 5, 6], [7, 8, 9, 10, 11]]
    m.suspend(v0)
    m.suspend(v1)
    m.suspend(v2)  # eviction order: v1 (priority 0, older), v2 (priority 0), v0 (priority 1)
    assert [m.suspended[x].last_used for x in (v0, v1, v2)] == [1, 2, 3]
    ok(fake, [act], [24], [20])  # 1 slot short: v1 (2 pages) fits on the host
    assert (m.suspended[v1].tier, m.suspended[v2].tier, m.suspended[v0].tier) == (HOST, GPU, GPU)
    assert m.suspended[v1].slots[0].tolist() == [0, 1]
    assert row(m, act, 0) == [7, 8, 9, 10, 11, 3]  # v1's slots came back 2 then 3: 3 on top
    ok(fake, [act], [32], [24])  # 1 short again: v2 (3 pages) does not fit the host (1 left): disk
    assert (m.suspended[v2].tier, m.suspended[v0].tier) == (DISK, GPU)
    assert m.suspended[v2].slots[0].tolist() == [0, 1, 2]
    assert row(m, act, 0) == [7, 8, 9, 10, 11, 3, 6, 5]
    s = m.stats()
    assert s.counters == Counters(steps=3, suspends=3, resumes=4, evictions=2, offloads=2,
                                  offload_bytes=5 * 64)
    assert s.pools == (
        PoolTierStats(0, GPU, 12, 2, 10, 2, 12),
        PoolTierStats(0, HOST, 3, 1, 2, 2, 2),
        PoolTierStats(0, DISK, 4, 1, 3, 3, 3),
    )
    assert (s.active_requests, s.suspended_requests) == (1, 3)
    # v2 back from disk needs 3, 2 are free: v0 would have to move but fits no lower tier
    before = snapshot(m)
    assert m.resume(v2) is False
    assert snapshot(m) == before
    m.close(act)
    fake.forget(act)
    assert m.resume(v2) is True
    assert m.resume(v1) is True
    fake.verify()
    m.check_invariants()
    s = m.stats(reset_peak=True)
    assert s.counters.onboards == 2 and s.counters.onboard_bytes == 5 * 64
    assert s.pools[0] == PoolTierStats(0, GPU, 12, 5, 7, 2, 12)
    assert m.stats().pools[0].peak_in_use == 7  # reset to the current use
    assert m.tiers.bytes_moved[(GPU, DISK)] == 3 * 64
    assert m.tiers.bytes_moved[(HOST, GPU)] == 2 * 64


def test_stats_of_a_fresh_and_a_busy_manager(managers: Callable[..., KVCacheManager]) -> None:
    m = managers(MIX, MIX_BYTES, batch=2, host_bytes=MIX_BYTES)
    s = m.stats()
    assert s.pools == (
        PoolTierStats(0, GPU, 11, 11, 0, 0, 0), PoolTierStats(1, GPU, 2, 2, 0, 0, 0),
        PoolTierStats(0, HOST, 11, 11, 0, 0, 0), PoolTierStats(1, HOST, 2, 2, 0, 0, 0),
        PoolTierStats(0, DISK, 0, 0, 0, 0, 0), PoolTierStats(1, DISK, 0, 0, 0, 0, 0),
    )
    assert s.counters == Counters() and (s.active_requests, s.suspended_requests) == (0, 0)
    fake = FakeEngine(m)
    _, b = fill_mix(m, fake)  # a: full 3 + window 2 (block 0 released), b: 3 + 3
    c = m.create()
    m.suspend(b)
    s = m.stats()
    assert s.pool(0) == PoolTierStats(0, GPU, 11, 0, 11, 6, 11)
    assert s.pool(1) == PoolTierStats(1, GPU, 2, 0, 2, 1, 2)
    assert s.counters == Counters(steps=2, suspends=1, resumes=2)
    assert (s.active_requests, s.suspended_requests) == (1, 2)
    assert m.state(c) is RequestState.SUSPENDED and m.lengths(c) == CacheLengths(0, 0, 0)
    s.counters.steps = 99  # a copy: the manager's counters are not exposed
    assert m.stats().counters.steps == 2


# ---- what a step hands the engine -----------------------------------------------------------


@pytest.fixture
def tables_manager(managers: Callable[..., KVCacheManager]) -> tuple[KVCacheManager, list[int]]:
    """window 8 + 4 sinks (tpb 4) and an ssm; a: 3 tokens, b: 17 (block 1 released), c: 8, d: 0."""
    m = managers((attention_layer(1, 8, 1, W8_SINK4), SSM), 16 * 64 + 4 * 16, batch=4)
    assert m.plan.slots == (16, 4)  # 4 decodes at worst: a sink block and 3 window blocks each
    fake = FakeEngine(m)
    h = [m.open() for _ in range(4)]
    ok(fake, h[:3], [3, 16, 8], [0, 0, 0])
    ok(fake, [h[1]], [17], [16])
    return m, h


def test_block_table_is_a_view_for_the_active_rows_in_order(tables_manager: tuple[KVCacheManager, list[int]]) -> None:
    m, h = tables_manager
    assert m.active_handles().tolist() == h
    t = m.step(m.active_handles(), [3, 17, 8, 0], [3, 16, 8, 0])
    assert t is not None and len(t) == 4
    bt = t.block_table(0)
    assert bt.dtype == np.int32 and np.shares_memory(bt, m.rows.tables[0])
    assert bt.tolist() == [[0, NULL, NULL, NULL, NULL], [1, NULL, 3, 4, 2], [5, 6, NULL, NULL, NULL], [NULL] * 5]
    assert np.shares_memory(t.seq_lens, m.rows.seq_lens) and t.seq_lens.tolist() == [3, 17, 8, 0]
    ssm = t.block_table(1)
    assert np.shares_memory(ssm, m.rows.tables[1]) and ssm.tolist() == [[0], [1], [2], [NULL]]
    p = t.paged(0)
    assert p.indptr.tolist() == [0, 1, 5, 7, 7]
    assert p.indices.tolist() == [0, 1, 3, 4, 2, 5, 6]  # sink page first, then the window
    assert p.last_page_len.tolist() == [3, 1, 4, 0]
    assert p.indptr.dtype == p.indices.dtype == p.last_page_len.dtype == np.int32
    q = t.paged(1)
    assert (q.indptr.tolist(), q.indices.tolist(), q.last_page_len.tolist()) == ([0, 1, 2, 3, 3], [0, 1, 2],
                                                                                 [1, 1, 1, 0])


def test_block_table_is_a_copy_for_any_other_batch(tables_manager: tuple[KVCacheManager, list[int]]) -> None:
    m, h = tables_manager
    t = m.step([h[2], h[0]], [8, 3], [8, 3])
    assert t is not None
    bt = t.block_table(0)
    assert not np.shares_memory(bt, m.rows.tables[0]) and bt.dtype == np.int32
    assert bt.tolist() == [[5, 6], [0, NULL]]  # width: the longest request of this batch
    assert t.seq_lens.tolist() == [8, 3] and not np.shares_memory(t.seq_lens, m.rows.seq_lens)
    p = t.paged(0)
    assert (p.indptr.tolist(), p.indices.tolist(), p.last_page_len.tolist()) == ([0, 2, 3], [5, 6, 0], [4, 3])
    t = m.step([h[1], h[3]], [17, 0], [16, 0])  # rows 1 and 3: not a prefix either
    assert t is not None and not np.shares_memory(t.block_table(0), m.rows.tables[0])
    assert t.block_table(0).tolist() == [[1, NULL, 3, 4, 2], [NULL] * 5]
    full = m.step(m.active_handles(), [3, 17, 8, 0], [3, 16, 8, 0])
    assert full is not None
    np.testing.assert_array_equal(full.block_table(0)[[1, 3]], t.block_table(0))
    empty = m.step([], [], [])
    assert empty is not None and len(empty) == 0 and empty.block_table(0).shape == (0, 0)


def test_suspending_a_row_moves_the_last_row_into_the_hole(tables_manager: tuple[KVCacheManager, list[int]]) -> None:
    m, h = tables_manager
    m.suspend(h[0])
    assert m.active_handles().tolist() == [h[3], h[1], h[2]]
    t = m.step(m.active_handles(), [0, 17, 8], [0, 16, 8])
    assert t is not None and np.shares_memory(t.block_table(0), m.rows.tables[0])
    assert t.block_table(0).tolist() == [[NULL] * 5, [1, NULL, 3, 4, 2], [5, 6, NULL, NULL, NULL]]
    assert m.resume(h[0])
    assert m.active_handles().tolist() == [h[3], h[1], h[2], h[0]]
    assert row(m, h[0], 0) == [0] and row(m, h[0], 1) == [0]
    m.check_invariants()


def test_paged_last_page_len_when_a_request_fits_one_block(managers: Callable[..., KVCacheManager]) -> None:
    m = managers((attention_layer(1, 8, 1, FULL),), 2 * 64, max_seq_len=4, tpb=4)
    h = m.open()
    t = m.step([h], [3], [0])
    assert t is not None and t.block_table(0).tolist() == [[0]]
    assert t.paged(0).last_page_len.tolist() == [3]


@pytest.mark.cuda
def test_offload_from_cuda_to_pinned_host_keeps_every_byte() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from hybridkv.storage.torch_backend import TorchCopyEngine

    big = tuple(attention_layer(8, 128, 2, FULL) for _ in range(4))  # 16 KiB per token
    m = build(big, 2**30, max_seq_len=4096, tpb=16, host_bytes=2**30, gpu_backend="torch",
              gpu_options={"device": "cuda"}, host_backend="torch", host_options={"pin_memory": True},
              copy_engine=TorchCopyEngine())
    fake = FakeEngine(m)
    h = m.open()
    ok(fake, [h], [4096], [0])  # 64 MiB of pages
    m.suspend(h)
    assert m.offload(h, HOST)
    torch.cuda.synchronize()
    try:
        fake.verify()
    finally:
        m.close_storage()


# ---- batched close and the step check ------------------------------------------------------


def test_close_many_frees_every_page_and_keeps_rows_dense(managers: Callable[..., KVCacheManager]) -> None:
    m = managers(MIX, 4 * MIX_BYTES, batch=5, max_active=6)
    fake = FakeEngine(m)
    hs = [m.open() for _ in range(5)]
    ok(fake, hs, [5, 9, 3, 12, 7], [0, 0, 0, 0, 0])
    m.suspend(hs[4])  # a suspended cache closes in the same call
    survivors_before = {h: [row(m, h, g) for g in range(3)] for h in (hs[1], hs[3])}
    in_use = gpu_in_use(m)
    freed = [int(live_blocks(lc, c, 0, 4)) for lc in (FULL, W8) for c in (5, 3, 7)]
    m.close_many([hs[0], hs[2], hs[4]])
    assert [m.state(h) for h in hs] == [RequestState.CLOSED, RequestState.ACTIVE, RequestState.CLOSED,
                                        RequestState.ACTIVE, RequestState.CLOSED]
    assert m.active_handles().tolist() in ([hs[3], hs[1]], [hs[1], hs[3]]) and m.rows.n == 2
    assert {h: [row(m, h, g) for g in range(3)] for h in (hs[1], hs[3])} == survivors_before
    gpu_after = gpu_in_use(m)
    assert gpu_after == [in_use[0] - sum(freed), in_use[1] - 3]
    m.check_invariants()
    fake.verify()
    before = snapshot(m)
    for bad in ([hs[1], hs[1]], [hs[0]], [99], [hs[1], -1]):
        with pytest.raises(UsageError):
            m.close_many(bad)
        assert snapshot(m) == before


def test_shortfall_answers_what_step_does(managers: Callable[..., KVCacheManager]) -> None:
    """``shortfall`` changes nothing and is zero exactly when the same step succeeds."""
    m = managers(MIX, MIX_BYTES, batch=2)
    fake = FakeEngine(m)
    a, b = fill_mix(m, fake)  # pool group 0 full
    before = snapshot(m)
    assert m.shortfall([a, b], [13, 10], [12, 9]) == [2, 0]  # each crosses into a new block
    assert snapshot(m) == before
    assert m.step([a, b], [13, 10], [12, 9]) is None
    assert m.shortfall([a], [12], [12]) == [0, 0]
    assert m.step([a], [12], [12]) is not None
    with pytest.raises(UsageError):
        m.shortfall([a], [40], [12])  # beyond max_seq_len: misuse, as in step
