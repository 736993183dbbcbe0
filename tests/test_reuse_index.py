"""PrefixIndex: probe against a token-level brute force, refcounts, eviction order, invariants."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_mask import visible
from conftest import DISK, HOST
from hybridkv.core.errors import ConfigError, InvariantError, UsageError
from hybridkv.core.types import GPU, LayerGroupId
from hybridkv.lifecycles import Chunked, Full, LifeCycle, Sliding, Ssm, live_blocks
from hybridkv.reuse import EntryRef, PrefixIndex, ReuseScope, block_keys, longest_match, needed_blocks

SCOPE = ReuseScope()
ROOT = SCOPE.root()
G0, G1 = LayerGroupId(0), LayerGroupId(1)


def chain(num_blocks: int, tpb: int, salt: str = "") -> list[bytes]:
    return block_keys(np.arange(num_blocks * tpb), tpb, ReuseScope(cache_salt=salt))


# ---- brute force: an attention mask evaluated token by token ------------------------------

def brute_needed(lc: LifeCycle, b: int, tpb: int) -> list[int]:
    """Blocks a request resuming at history b * tpb reads: some token of the block is visible
    to some future query (SSM: the snapshot at b - 1)."""
    if isinstance(lc, Ssm):
        return [b - 1] if b else []
    h = b * tpb
    horizon = h + (lc.window_tokens or 0) + (lc.chunk_tokens or 0) + 2
    return [j for j in range(b)
            if any(visible(lc, p, q) for q in range(j * tpb, (j + 1) * tpb) for p in range(h, horizon))]


def brute_match(lcs: list[LifeCycle], cached: list[set[int]], n: int, tpb: int) -> int:
    ok = [b for b in range(n + 1) if all(set(brute_needed(lc, b, tpb)) <= c for lc, c in zip(lcs, cached, strict=True))]
    return max(ok)


life_cycles = st.one_of(
    st.just(Full()),
    st.builds(Sliding, st.integers(1, 20), st.integers(0, 9)),
    st.builds(Chunked, st.integers(1, 20)),
    st.just(Ssm()),
)


def populate(lcs: list[LifeCycle], cached: list[set[int]], keys: list[bytes]) -> PrefixIndex:
    idx = PrefixIndex()
    for g, c in enumerate(cached):
        ords = np.array(sorted(c), np.int64)
        idx.insert(keys, ords, g, 100 * g + ords, GPU, root=ROOT)
    return idx


@settings(max_examples=300, deadline=None)
@given(st.lists(life_cycles, min_size=1, max_size=4), st.sampled_from([1, 2, 3, 4, 8]), st.integers(0, 12),
       st.data())
def test_probe_is_the_brute_force_maximum(lcs: list[LifeCycle], tpb: int, n: int, data: st.DataObject) -> None:
    keys = chain(n, tpb)
    dense = data.draw(st.booleans())  # mostly-cached layouts reach the long matches
    blocks = st.integers(0, max(n - 1, 0))
    cached = [set(range(n)) - data.draw(st.sets(blocks, max_size=2)) if dense and n else data.draw(st.sets(blocks))
              for _ in lcs]
    if n == 0:
        cached = [set() for _ in lcs]
    idx = populate(lcs, cached, keys)
    match = idx.probe(keys, lcs, tpb)
    expect = brute_match(lcs, cached, n, tpb)
    assert match.tokens == expect * tpb
    for g, (lc, mb) in enumerate(zip(lcs, match.per_group, strict=True)):
        assert mb.ordinals.tolist() == brute_needed(lc, expect, tpb)
        assert mb.slots.tolist() == (100 * g + mb.ordinals).tolist()
        assert (mb.tiers == GPU).all()
        if not isinstance(lc, Ssm):  # the same count the manager's release rule keeps
            assert mb.ordinals.size == int(live_blocks(lc, expect * tpb, expect * tpb, tpb))


@settings(max_examples=100, deadline=None)
@given(st.lists(life_cycles, min_size=1, max_size=3), st.sampled_from([1, 2, 4]), st.integers(1, 10), st.data())
def test_probe_with_max_tier_ignores_lower_tiers(lcs: list[LifeCycle], tpb: int, n: int, data: st.DataObject) -> None:
    keys = chain(n, tpb)
    idx = PrefixIndex()
    usable: list[set[int]] = []
    for g in range(len(lcs)):
        tiers = data.draw(st.lists(st.sampled_from([None, GPU, HOST, DISK]), min_size=n, max_size=n))
        for t in (GPU, HOST, DISK):
            ords = np.array([j for j in range(n) if tiers[j] is t], np.int64)
            idx.insert(keys, ords, g, ords, t, root=ROOT)
        usable.append({j for j in range(n) if tiers[j] is not None and tiers[j] <= HOST})
    match = idx.probe(keys, lcs, tpb, max_tier=HOST)
    assert match.tokens == brute_match(lcs, usable, n, tpb) * tpb
    assert all((mb.tiers <= HOST).all() for mb in match.per_group)


@settings(max_examples=200, deadline=None)
@given(st.lists(life_cycles, min_size=1, max_size=4), st.sampled_from([1, 2, 4]), st.integers(0, 16), st.data())
def test_longest_match_looks_at_each_block_once_per_group(lcs: list[LifeCycle], tpb: int, n: int,
                                                          data: st.DataObject) -> None:
    cached = [data.draw(st.sets(st.integers(0, max(n - 1, 0)))) if n else set() for _ in lcs]
    seen: list[list[int]] = [[] for _ in lcs]

    def presence(g: int) -> Callable[[int], bool]:
        def present(j: int) -> bool:
            seen[g].append(j)
            return j in cached[g]
        return present

    assert longest_match(lcs, [presence(g) for g in range(len(lcs))], n, tpb) == brute_match(lcs, cached, n, tpb)
    assert all(len(s) == len(set(s)) and all(0 <= j < n for j in s) for s in seen)


def test_needed_blocks_exact() -> None:
    assert needed_blocks(Full(), 3, 4).tolist() == [0, 1, 2]
    assert needed_blocks(Sliding(8), 10, 4).tolist() == [8, 9]  # keep_start 33
    assert needed_blocks(Sliding(10), 10, 4).tolist() == [7, 8, 9]  # keep_start 31
    assert needed_blocks(Sliding(3), 10, 4).tolist() == [9]  # window < tpb
    assert needed_blocks(Sliding(8, 5), 10, 4).tolist() == [0, 1, 8, 9]  # 5 sinks: 2 blocks
    assert needed_blocks(Sliding(8, 5), 1, 4).tolist() == [0]
    assert needed_blocks(Chunked(8), 10, 4).tolist() == []  # 40 starts a new chunk
    assert needed_blocks(Chunked(8), 9, 4).tolist() == [8]
    assert needed_blocks(Ssm(), 6, 4).tolist() == [5]
    assert needed_blocks(Ssm(), 0, 4).tolist() == []


def test_evicted_window_blocks_still_match_only_the_window() -> None:
    """Full group caches all 10 blocks; the window group kept only its live window [8, 10)."""
    keys = chain(10, 4)
    full_ords, win_ords = np.arange(10), np.array([8, 9])
    for window, expect in ((8, 40), (9, 40), (3, 40), (10, 0)):
        idx = PrefixIndex()
        idx.insert(keys, full_ords, 0, full_ords, GPU, root=ROOT)
        idx.insert(keys, win_ords, 1, win_ords + 50, GPU, root=ROOT)
        match = idx.probe(keys, [Full(), Sliding(window)], 4)
        assert match.tokens == expect, window  # window 10 needs block 7 at 40, and every shorter prefix needs more
        if expect:
            assert match.per_group[0].ordinals.tolist() == list(range(10))
            assert match.per_group[1].ordinals.tolist() == ([9] if window == 3 else [8, 9])
            assert match.per_group[1].slots.tolist() == ([59] if window == 3 else [58, 59])
        idx.check_invariants()


def test_ssm_needs_a_snapshot_at_exactly_l() -> None:
    keys = chain(10, 4)
    idx = PrefixIndex()
    idx.insert(keys, np.arange(10), 0, np.arange(10), GPU, root=ROOT)
    idx.insert(keys, [5], 1, [77], HOST, root=ROOT)  # snapshot after 24 tokens
    match = idx.probe(keys, [Full(), Ssm()], 4)
    assert match.tokens == 24
    assert match.per_group[1].ordinals.tolist() == [5]
    assert match.per_group[1].slots.tolist() == [77] and match.per_group[1].tiers.tolist() == [HOST]
    assert idx.probe(keys[:5], [Full(), Ssm()], 4).tokens == 0
    assert idx.probe(keys, [Full(), Ssm()], 4, max_tier=GPU).tokens == 0


def entries_state(idx: PrefixIndex) -> Any:
    t = idx._t
    rows = t.live_rows()
    return sorted(tuple(t.snapshot(r).__repr__() for r in rows.tolist()))


def test_probe_changes_nothing() -> None:
    keys = chain(6, 4)
    idx = PrefixIndex()
    idx.insert(keys, np.arange(6), 0, np.arange(6), GPU, root=ROOT)
    before, clock = entries_state(idx), idx._clock
    idx.probe(keys, [Full()], 4)
    assert entries_state(idx) == before and idx._clock == clock


# ---- insert, refcounts, eviction ---------------------------------------------------------

def test_insert_is_idempotent_and_reports_duplicates() -> None:
    keys = chain(6, 4)
    idx = PrefixIndex()
    r1 = idx.insert(keys, [0, 1, 2], 0, [10, 11, 12], GPU, root=ROOT)
    assert r1.new_mask.tolist() == [True] * 3 and r1.num_new == 3
    r2 = idx.insert(keys, [1, 2, 3, 4], 0, [21, 22, 23, 24], GPU, root=ROOT)
    assert r2.new_mask.tolist() == [False, False, True, True]
    assert r2.cached_slots.tolist() == [11, 12, 23, 24]
    r3 = idx.insert(keys, [0], 1, [30], GPU, root=ROOT)  # another group is another entry
    assert r3.num_new == 1 and len(idx) == 6
    e = idx.entry(keys[3], 0)
    assert e is not None and (e.parent, e.ordinal, e.slot, e.refcount) == (keys[2], 3, 23, 0)
    first = idx.entry(keys[0], 0)
    assert first is not None and first.parent == ROOT
    idx.check_invariants()


def test_insert_refuses_misuse_and_changes_nothing() -> None:
    keys = chain(4, 4)
    idx = PrefixIndex()
    idx.insert(keys, [0, 1], 0, [0, 1], GPU, root=ROOT)
    before = entries_state(idx)
    for ords, slots in (([1, 0], [5, 6]), ([0, 4], [5, 6]), ([2], [5, 6]), ([2], [-1])):
        with pytest.raises(UsageError):
            idx.insert(keys, ords, 0, slots, GPU, root=ROOT)
    with pytest.raises(UsageError, match="already cached as block 0"):
        idx.insert([keys[1], keys[0]], [1], 0, [9], GPU, root=ROOT)
    assert entries_state(idx) == before
    idx.check_invariants()


def test_refcounts_and_eviction_order_exact() -> None:
    keys = chain(4, 4)
    idx = PrefixIndex()
    idx.insert(keys, [0, 1, 2, 3], 0, [0, 1, 2, 3], GPU, root=ROOT)  # clock 1
    idx.insert(keys, [2, 3], 1, [8, 9], GPU, priority=5, root=ROOT)  # clock 2, kept longer
    idx.acquire(keys, [0, 1], 0)  # clock 3
    assert [e.key for e in idx.evictable(GPU)] == [keys[3], keys[2], keys[3], keys[2]]
    assert [(e.ordinal, e.layer_group) for e in idx.evictable(GPU)] == [(3, 0), (2, 0), (3, 1), (2, 1)]
    assert idx.evictable(HOST) == []
    with pytest.raises(UsageError, match="refcount > 0"):
        idx.remove([EntryRef(keys[0], G0)])
    idx.acquire(keys, [1], 0)  # block 1 used twice
    idx.release(keys, [0, 1], 0)  # clock 5: 0 free again, 1 still used once
    e0 = idx.entry(keys[0], 0)
    e1 = idx.entry(keys[1], 0)
    assert e0 is not None and e1 is not None and (e0.refcount, e1.refcount) == (0, 1)
    idx.touch([keys[3]], layer_group=0)  # clock 6: block 3 most recently used
    order = [(int(e.ordinal), int(e.layer_group)) for e in idx.evictable(GPU)]
    assert order == [(2, 0), (0, 0), (3, 0), (3, 1), (2, 1)]
    assert [(int(e.ordinal), int(e.layer_group)) for e in idx.evictable(GPU, layer_group=1)] == [(3, 1), (2, 1)]
    assert len(idx.evictable(GPU, limit=2)) == 2
    idx.release(keys, [1], 0)
    with pytest.raises(UsageError, match="not acquired"):
        idx.release(keys, [1], 0)
    with pytest.raises(UsageError, match="not cached"):
        idx.acquire(keys, [0, 1], 1)  # block 0, 1 of group 1 do not exist: nothing acquired
    assert idx.entry(keys[2], 1) is not None and idx.entry(keys[2], 1).refcount == 0  # type: ignore[union-attr]
    idx.check_invariants()


def test_acquire_and_release_match_are_all_or_nothing() -> None:
    keys = chain(10, 4)
    idx = PrefixIndex()
    idx.insert(keys, np.arange(10), 0, np.arange(10), GPU, root=ROOT)
    idx.insert(keys, [8, 9], 1, [20, 21], GPU, root=ROOT)
    lcs = [Full(), Sliding(8)]
    match = idx.probe(keys, lcs, 4)
    idx.acquire_match(match)
    assert all(e.refcount == 1 for e in (idx.entry(k, 0) for k in keys) if e is not None)
    assert idx.evictable(GPU) == []
    idx.release_match(match)
    with pytest.raises(UsageError):
        idx.release_match(match)
    assert len(idx.evictable(GPU)) == 12
    idx.check_invariants()


def test_remove_move_clear_hand_entries_back() -> None:
    keys = chain(3, 4)
    idx = PrefixIndex()
    idx.insert(keys, [0, 1, 2], 0, [5, 6, 7], GPU, root=ROOT)
    old = idx.move([EntryRef(keys[1], G0), EntryRef(keys[2], G0)], HOST, [40, 41])
    assert [(e.slot, e.tier) for e in old] == [(6, GPU), (7, GPU)]
    assert [e.slot for e in idx.evictable(HOST)] == [41, 40]
    gone = idx.remove([EntryRef(keys[2], G0)])
    assert [(e.slot, e.tier) for e in gone] == [(41, HOST)]
    with pytest.raises(UsageError, match="no entry"):
        idx.remove([EntryRef(keys[2], G0)])
    with pytest.raises(UsageError, match="twice"):
        idx.remove([EntryRef(keys[0], G0), EntryRef(keys[0], G0)])
    idx.check_invariants()  # block 1 stays while block 2 is gone; block 0 stays too
    idx.remove([EntryRef(keys[0], G0)])  # a child whose parent was removed is allowed
    idx.check_invariants()
    assert idx.probe(keys, [Full()], 4).tokens == 0
    assert idx.probe(keys, [Sliding(4)], 4).tokens == 8  # window needs only block 1
    idx.acquire(keys, [1], 0)
    with pytest.raises(UsageError, match="clear"):
        idx.clear()
    idx.release(keys, [1], 0)
    assert [e.slot for e in idx.clear()] == [40]
    assert len(idx) == 0
    idx.check_invariants()


def test_check_invariants_catches_corruption() -> None:
    keys = chain(3, 4)
    idx = PrefixIndex()
    idx.insert(keys, [0, 1, 2], 0, [0, 1, 2], GPU, root=ROOT)
    row = idx._t.by_group[G0][keys[1]]
    idx._t.refcount[row] = -1
    with pytest.raises(InvariantError, match="refcount"):
        idx.check_invariants()
    idx._t.refcount[row] = 0
    idx._t.ordinal[row] = 5
    with pytest.raises(InvariantError, match="parent"):
        idx.check_invariants()
    idx._t.ordinal[row] = 1
    idx._t.slot[row] = 0
    with pytest.raises(InvariantError, match="share"):
        idx.check_invariants()


def test_rows_are_recycled_and_table_grows() -> None:
    keys = chain(600, 1)
    idx = PrefixIndex()
    idx.insert(keys, np.arange(600), 0, np.arange(600), GPU, root=ROOT)
    idx.remove([e.ref for e in idx.evictable(GPU, limit=300)])
    assert len(idx) == 300
    idx.insert(keys, np.arange(300, 600), 1, np.arange(300), DISK, root=ROOT)
    assert len(idx) == 600 and idx._t.live.size == 600  # grew once (256 -> 600), then reused freed rows
    assert idx.probe(keys, [Full()], 1).tokens == 300
    idx.check_invariants()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["insert", "acquire", "release", "touch", "evict", "move"]),
                          st.integers(0, 1), st.sets(st.integers(0, 7), min_size=1)), max_size=30))
def test_random_operations_against_a_model(ops: list[tuple[str, int, set[int]]]) -> None:
    """A dict model of (group, ordinal) -> [refcount, priority, last_used, tier]: the index's
    eviction order and refcounts agree with it after every operation."""
    keys = chain(8, 2)
    idx = PrefixIndex()
    model: dict[tuple[int, int], list[int]] = {}
    clock, next_slot = 0, 0
    for op, g, ords_set in ops:
        ords = sorted(ords_set)
        present = [o for o in ords if (g, o) in model]
        if op == "insert":
            clock += 1
            slots = list(range(next_slot, next_slot + len(ords)))
            next_slot += len(ords)
            res = idx.insert(keys, ords, g, slots, GPU, priority=g, root=ROOT)
            assert res.new_mask.tolist() == [(g, o) not in model for o in ords]
            for o in ords:
                model.setdefault((g, o), [0, g, clock, GPU])
        elif op in ("acquire", "release") and present:
            if op == "release" and any(model[g, o][0] == 0 for o in present):
                with pytest.raises(UsageError):
                    idx.release(keys, present, g)
                continue
            clock += 1
            getattr(idx, op)(keys, present, g)
            for o in present:
                model[g, o][0] += 1 if op == "acquire" else -1
                model[g, o][2] = clock
        elif op == "touch":
            clock += 1
            idx.touch([keys[o] for o in ords], layer_group=g)
            for o in present:
                model[g, o][2] = clock
        elif op == "evict":
            victims = idx.evictable(GPU, limit=len(ords))
            idx.remove([v.ref for v in victims])
            for victim in victims:
                del model[int(victim.layer_group), int(victim.ordinal)]
        elif op == "move" and present:
            new_slots = [1000 + next_slot + i for i in range(len(present))]
            idx.move([EntryRef(keys[o], LayerGroupId(g)) for o in present], HOST, new_slots)
            next_slot += len(present)
            for o in present:
                model[g, o][3] = HOST
        idx.check_invariants()
        for tier in (GPU, HOST):
            expect = sorted((k for k, v in model.items() if v[0] == 0 and v[3] == tier),
                            key=lambda k: (model[k][1], model[k][2], -k[1], k[0]))
            assert [(int(e.layer_group), int(e.ordinal)) for e in idx.evictable(tier)] == expect
            for k in range(len(expect) + 2):
                assert [(int(e.layer_group), int(e.ordinal)) for e in idx.evictable(tier, limit=k)] == expect[:k]
        for (mg, mo), v in model.items():
            got = idx.entry(keys[mo], mg)
            assert got is not None and got.refcount == v[0] and got.last_used == v[2]


def test_eviction_order_with_ties_and_huge_priorities() -> None:
    """Equal (priority, last_used, ordinal, group) fall back to row order, with or without a
    limit; priorities too far apart to pack into one int64 take the lexsort path."""
    idx = PrefixIndex()
    chains = [chain(3, 2, salt=str(i)) for i in range(4)]
    for i, keys in enumerate(chains):
        idx.insert(keys, [0, 1, 2], 0, 10 * i + np.arange(3), GPU, priority=(-(2**59) if i == 3 else 2**59),
                   root=ReuseScope(cache_salt=str(i)).root())
    idx.touch([k for keys in chains[:3] for k in keys])  # chains 0..2 tie completely
    order = [e.slot for e in idx.evictable(GPU)]
    assert order == [32, 31, 30, 2, 12, 22, 1, 11, 21, 0, 10, 20]
    for k in range(14):
        assert [e.slot for e in idx.evictable(GPU, limit=k)] == order[:k]
    idx2 = PrefixIndex()  # same ties, packed path
    for i, keys in enumerate(chains[:3]):
        idx2.insert(keys, [0, 1, 2], 0, 10 * i + np.arange(3), GPU, root=ReuseScope(cache_salt=str(i)).root())
    idx2.touch([k for keys in chains[:3] for k in keys])
    for k in (1, 2, 4, 5, 9, 10):
        assert [e.slot for e in idx2.evictable(GPU, limit=k)] == order[3:3 + k]
    with pytest.raises(UsageError, match="limit"):
        idx2.evictable(GPU, limit=-1)
    with pytest.raises(ConfigError, match="priority-lru"):
        PrefixIndex(eviction="fifo")


def test_located_and_entries() -> None:
    keys = chain(4, 2)
    idx = PrefixIndex()
    idx.insert(keys, [0, 1, 2, 3], 0, [5, 6, 7, 8], GPU, root=ROOT)
    idx.insert(keys, [3], 1, [9], GPU, root=ROOT)
    idx.move([EntryRef(keys[1], G0)], HOST, [0])
    groups, slots = idx.located(GPU)
    assert sorted(zip(groups.tolist(), slots.tolist(), strict=True)) == [(0, 5), (0, 7), (0, 8), (1, 9)]
    assert idx.located(HOST).slots.tolist() == [0] and idx.located(DISK).slots.size == 0
    assert sorted((int(e.layer_group), int(e.ordinal), e.tier) for e in idx.entries()) == [
        (0, 0, GPU), (0, 1, HOST), (0, 2, GPU), (0, 3, GPU), (1, 3, GPU)]


def test_windowed_groups_lose_their_oldest_blocks_first() -> None:
    """Among entries of equal priority and age, full attention loses its deepest block first
    (a hole in the middle ruins the rest) and a windowed group its shallowest (a continuation
    needs the newest window)."""
    idx = PrefixIndex(windowed_groups=[1])
    keys = [bytes([i]) * 32 for i in range(4)]
    for group in (0, 1):
        idx.insert(keys, [0, 1, 2, 3], group, [10, 11, 12, 13], GPU, root=b"r" * 32)
    assert [e.ordinal for e in idx.evictable(GPU, layer_group=0)] == [3, 2, 1, 0]
    assert [e.ordinal for e in idx.evictable(GPU, layer_group=1)] == [0, 1, 2, 3]
    assert [e.ordinal for e in idx.evictable(GPU, layer_group=1, limit=2)] == [0, 1]


# ---- dead entries: pages no match can use go first ------------------------------------------

def brute_serves(lc: LifeCycle, o: int, tpb: int, horizon: int) -> set[int]:
    """Histories (in blocks, up to ``horizon``) whose match reads block ``o``, by the mask."""
    return {b for b in range(1, horizon) if o in brute_needed(lc, b, tpb)}


@settings(max_examples=150, deadline=None)
@given(lc=life_cycles, tpb=st.integers(1, 4), o=st.integers(0, 12))
def test_serves_is_the_brute_force_range(lc: LifeCycle, tpb: int, o: int) -> None:
    lo, hi = lc.serves(o, tpb)
    horizon = o + 30 // tpb + 8
    expect = brute_serves(lc, o, tpb, horizon)
    assert set(range(lo, (horizon if hi is None else hi + 1))) & set(range(1, horizon)) == expect
    if hi is None:  # unbounded: needed by every later history
        assert expect == set(range(o + 1, horizon))


@settings(max_examples=150, deadline=None)
@given(lcs=st.lists(life_cycles, min_size=2, max_size=4), tpb=st.integers(1, 3), n=st.integers(1, 10),
       data=st.data())
def test_dead_entries_serve_no_match_and_the_rule_is_exact(lcs: list[LifeCycle], tpb: int, n: int,
                                                           data: st.DataObject) -> None:
    """Random presence per group along one chain. A dead entry is read by no servable match
    (brute force over every history); and an entry is dead exactly when it is needed by no
    history at all, or some group lacks the same block and every history reading this entry
    reads that group's block too."""
    keys = chain(n, tpb)
    cached = [data.draw(st.sets(st.integers(0, n - 1)), label=f"cached {g}") for g in range(len(lcs))]
    idx = PrefixIndex(life_cycles=lcs, tokens_per_block=tpb)
    for g, c in enumerate(cached):
        ords = np.array(sorted(c), np.int64)
        idx.insert(keys, ords, g, 100 * g + ords, GPU, root=ROOT)
    idx.settle()
    idx.check_invariants()
    horizon = n + 30 // tpb + 8
    dead = {(int(e.layer_group), int(e.ordinal)) for e in idx.entries() if e.dead}
    servable = [b for b in range(1, n + 1)
                if all(set(brute_needed(lc, b, tpb)) <= c for lc, c in zip(lcs, cached, strict=True))]
    for g, o in dead:
        assert not any(o in brute_needed(lcs[g], b, tpb) for b in servable)
    for g, c in enumerate(cached):
        for o in c:
            mine = brute_serves(lcs[g], o, tpb, horizon)
            expect = not mine or any(o not in cached[m] and mine <= brute_serves(lcs[m], o, tpb, horizon)
                                     for m in range(len(lcs)))
            assert ((g, o) in dead) == expect, (g, o)


def test_a_dropped_block_kills_what_only_served_with_it_and_a_publish_revives_it() -> None:
    """Full (0), window of 8 tokens (1) and two slices of one state (2, 3), tpb 4, 4 blocks
    each (the state a snapshot at block 3). Dropping the full block 3 kills the window block 3
    and both snapshots (every match reading them reads full block 3); they are evicted next,
    before the older live blocks. Dropping window block 3 instead kills only the snapshots;
    dropping one slice kills the other. Re-inserting the dropped block revives them all."""
    lcs: list[LifeCycle] = [Full(), Sliding(8), Ssm(), Ssm()]
    keys = chain(4, 4)

    def build() -> PrefixIndex:
        idx = PrefixIndex(windowed_groups=[1], life_cycles=lcs, tokens_per_block=4)
        for g in (0, 1):
            idx.insert(keys, [0, 1, 2, 3], g, [10 * g, 10 * g + 1, 10 * g + 2, 10 * g + 3], GPU, root=ROOT)
        for g in (2, 3):
            idx.insert(keys, [3], g, [10 * g], GPU, root=ROOT)
        assert idx.settle().size == 0  # nothing dead
        return idx

    def dead(idx: PrefixIndex) -> list[tuple[int, int]]:
        return sorted((int(e.layer_group), int(e.ordinal)) for e in idx.entries() if e.dead)

    idx = build()
    idx.remove([EntryRef(keys[3], G0)])
    assert idx.settle().size == 3
    assert dead(idx) == [(1, 3), (2, 3), (3, 3)]
    idx.check_invariants()
    first = [(int(e.layer_group), int(e.ordinal)) for e in idx.evictable(GPU)][:3]
    assert sorted(first) == [(1, 3), (2, 3), (3, 3)]
    idx.insert(keys, [3], 0, [3], GPU, root=ROOT)
    assert idx.settle().size == 3 and dead(idx) == []

    idx = build()
    idx.remove([EntryRef(keys[3], G1)])
    idx.settle()
    assert dead(idx) == [(2, 3), (3, 3)]  # full block 3 stays live: it also serves longer matches

    idx = build()
    idx.remove([EntryRef(keys[3], LayerGroupId(2))])
    idx.settle()
    assert dead(idx) == [(3, 3)]
    idx.check_invariants()


def test_dead_flags_are_checked_by_the_invariants() -> None:
    idx = PrefixIndex(life_cycles=[Full(), Ssm()], tokens_per_block=2)
    keys = chain(2, 2)
    idx.insert(keys, [1], 1, [7], GPU, root=ROOT)  # a snapshot whose full blocks are missing
    idx.settle()
    assert [e.dead for e in idx.entries()] == [True]
    idx._t.dead[:] = 0  # corrupt it
    with pytest.raises(InvariantError, match="dead flag"):
        idx.check_invariants()
