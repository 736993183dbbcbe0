"""SlotAllocator: exact ids (lowest first, then LIFO reuse), bulk ops, atomic refusals, peaks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv.core.errors import UsageError
from hybridkv.storage.allocator import SlotAllocator


def state(a: SlotAllocator) -> tuple:
    """Everything an operation could change, for 'nothing changed' checks."""
    return (a._stack.tobytes(), a._top, a._refs.tobytes(), a.peak_in_use, a.num_free, a.num_in_use)


def ids(x: np.ndarray | None) -> list[int]:
    assert x is not None
    assert x.dtype == np.int32
    return x.tolist()


def test_fresh_pool_hands_out_lowest_ids_first() -> None:
    a = SlotAllocator(10, "gpu")
    assert (a.num_slots, a.num_free, a.num_in_use, a.peak_in_use) == (10, 10, 0, 0)
    assert ids(a.allocate(3)) == [0, 1, 2]
    a.check_invariants()
    assert ids(a.allocate(1)) == [3]
    assert ids(a.allocate(4)) == [4, 5, 6, 7]
    a.check_invariants()
    assert (a.num_free, a.num_in_use) == (2, 8)
    assert a.is_allocated([0, 7, 8, 9]).tolist() == [True, True, False, False]


def test_freed_slots_are_reused_last_freed_first() -> None:
    a = SlotAllocator(8)
    assert ids(a.allocate(6)) == [0, 1, 2, 3, 4, 5]
    a.free(np.array([1, 4], np.int32))  # pushed in order: 4 ends on top
    a.check_invariants()
    assert (a.num_free, a.num_in_use) == (4, 4)
    assert ids(a.allocate(1)) == [4]
    a.check_invariants()
    assert ids(a.allocate(2)) == [1, 6]
    a.check_invariants()
    assert ids(a.allocate(1)) == [7]
    assert a.num_free == 0


def test_bulk_allocate_and_free_everything() -> None:
    a = SlotAllocator(1000)
    first = a.allocate(600)
    assert ids(first) == list(range(600))
    second = a.allocate(400)
    assert ids(second) == list(range(600, 1000))
    a.check_invariants()
    assert a.allocate(1) is None
    a.free(first[::2])
    a.check_invariants()
    assert (a.num_free, a.num_in_use) == (300, 700)
    a.free(np.concatenate([first[1::2], second]))
    a.check_invariants()
    assert (a.num_free, a.num_in_use, a.peak_in_use) == (1000, 0, 1000)
    again = a.allocate(1000)
    assert sorted(ids(again)) == list(range(1000))
    a.check_invariants()


def test_allocate_zero_and_free_empty_are_no_ops() -> None:
    a = SlotAllocator(4)
    before = state(a)
    assert ids(a.allocate(0)) == []
    a.free([])
    a.free(np.zeros(0, np.int32))
    assert state(a) == before
    a.check_invariants()


def test_short_pool_returns_none_and_changes_nothing() -> None:
    a = SlotAllocator(5)
    assert ids(a.allocate(3)) == [0, 1, 2]
    before = state(a)
    assert a.allocate(3) is None
    assert state(a) == before
    a.check_invariants()
    assert ids(a.allocate(2)) == [3, 4]
    before = state(a)
    assert a.allocate(1) is None
    assert state(a) == before


def test_negative_count_is_usage_error() -> None:
    a = SlotAllocator(3)
    before = state(a)
    with pytest.raises(UsageError, match="cannot allocate -1"):
        a.allocate(-1)
    assert state(a) == before
    with pytest.raises(UsageError, match="num_slots must be >= 0"):
        SlotAllocator(-1, "disk pool")


@pytest.mark.parametrize("bad", [
    [2],  # double free: 2 went back already
    [0, 2],  # one good id, one already free
    [5],  # foreign: beyond the pool
    [-1],  # foreign: negative
    [0, 0],  # the same slot twice in one call
    [1, 3, 1],
])
def test_double_free_and_foreign_ids_raise_and_change_nothing(bad: list[int]) -> None:
    a = SlotAllocator(5, "pool x")
    a.allocate(4)
    a.free([2])
    a.check_invariants()
    before = state(a)
    with pytest.raises(UsageError, match="pool x"):
        a.free(np.array(bad))
    assert state(a) == before
    a.check_invariants()


def test_free_distinct_skips_the_repeat_check_but_not_the_ownership_check() -> None:
    a = SlotAllocator(6)
    a.allocate(5)
    a.free(np.array([3, 0], np.int32), distinct=True)
    a.check_invariants()
    assert ids(a.allocate(2)) == [0, 3]
    before = state(a)
    with pytest.raises(UsageError, match="not allocated"):
        a.free(np.array([1, 5], np.int32), distinct=True)  # 5 was never handed out
    assert state(a) == before


def test_foreign_id_on_empty_pool_is_usage_error() -> None:
    a = SlotAllocator(0, "HOST pool group 0")  # a tier with no quota has 0 slots
    with pytest.raises(UsageError):
        a.free([0])


def test_peak_tracks_the_high_water_mark_and_resets_to_current() -> None:
    a = SlotAllocator(10)
    a.allocate(4)
    assert a.peak_in_use == 4
    x = a.allocate(3)
    assert a.peak_in_use == 7
    a.free(x)
    assert (a.num_in_use, a.peak_in_use) == (4, 7)
    a.allocate(2)
    assert a.peak_in_use == 7
    a.reset_peak()
    assert a.peak_in_use == 6
    assert a.allocate(5) is None  # a refused allocation does not move the peak
    assert a.peak_in_use == 6
    a.allocate(4)
    assert a.peak_in_use == 10
    a.check_invariants()


def test_zero_slot_pool() -> None:
    a = SlotAllocator(0)
    assert (a.num_free, a.num_in_use) == (0, 0)
    assert a.allocate(1) is None
    assert ids(a.allocate(0)) == []
    a.check_invariants()


@settings(max_examples=60, deadline=None)
@given(num_slots=st.integers(0, 40), ops=st.lists(st.tuples(st.booleans(), st.integers(0, 12)), max_size=40),
       seed=st.integers(0, 2**31))
def test_random_bulk_ops_against_a_set_model(num_slots: int, ops: list[tuple[bool, int]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = SlotAllocator(num_slots)
    held: set[int] = set()
    peak = 0
    for is_alloc, n in ops:
        if is_alloc:
            got = a.allocate(n)
            if n > num_slots - len(held):
                assert got is None
            else:
                assert got is not None and len(set(got.tolist())) == n
                assert not held & set(got.tolist())
                held |= set(got.tolist())
        elif held:
            k = min(n, len(held))
            gone = rng.choice(sorted(held), size=k, replace=False)
            a.free(gone)
            held -= set(gone.tolist())
        peak = max(peak, len(held))
        a.check_invariants()
        assert a.num_in_use == len(held) and a.peak_in_use == peak
        if num_slots:
            assert set(np.flatnonzero(a.is_allocated(np.arange(num_slots))).tolist()) == held


# ---- shared pages and pins ---------------------------------------------------------------


def test_shared_page_dropped_twice_in_one_free_returns_to_the_pool() -> None:
    """Two tables release one shared page in the same batched free: both references go
    (regression: a fancy-index update applied a repeated id once and leaked the page)."""
    a = SlotAllocator(4)
    s = a.allocate(2)
    assert s is not None
    a.retain(s)  # both pages shared by two tables
    a.free(np.concatenate([s, s]), distinct=True)  # the caller's hint cannot hold once pages are shared
    assert a.num_free == 4 and a.references(s).tolist() == [0, 0]
    a.check_invariants()


def test_reclaimable_count_is_exact_across_retain_free_pin_unpin() -> None:
    a = SlotAllocator(6)
    s = a.allocate(3)
    assert s is not None
    a.pin(s[:2])  # the cache pins two pages a request holds: refs 2, not reclaimable
    assert (a.num_pinned, a.num_reclaimable) == (2, 0)
    a.retain(s[:1])  # a second request shares page 0: refs 3
    a.free(np.array([s[0], s[0], s[1]]))  # both requests drop page 0, the first drops page 1
    assert (a.num_reclaimable, sorted(a.drain_reclaimed().tolist())) == (2, sorted(s[:2].tolist()))
    assert a.drain_reclaimed().size == 0
    a.retain(s[:1])  # a hit takes page 0 again
    assert a.num_reclaimable == 1 and a.reclaimable_slots().tolist() == [int(s[1])]
    with pytest.raises(UsageError):  # the pin is the last reference: only unpin may drop it
        a.free(s[1:2])
    assert a.num_reclaimable == 1
    a.unpin(s[1:2])
    assert (a.num_pinned, a.num_reclaimable, a.num_free) == (1, 0, 4)
    fresh = a.allocate(1)
    assert fresh is not None
    a.pin(fresh, retain=False)  # the allocation itself becomes the pin: reclaimable at once
    assert a.num_reclaimable == 1 and a.drain_reclaimed().tolist() == fresh.tolist()
    with pytest.raises(UsageError):
        a.pin(fresh)  # already pinned
    with pytest.raises(UsageError):
        a.unpin(s[2:3])  # never pinned
    a.check_invariants()


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["alloc", "retain", "free", "pin", "unpin"]), st.integers(0, 7),
                              st.integers(1, 3)), max_size=60))
def test_random_pins_keep_the_reclaimable_count_exact(ops: list[tuple[str, int, int]]) -> None:
    """A plain model (reference counts and a pinned set) against the allocator's counters."""
    a, refs, pinned = SlotAllocator(8), [0] * 8, set()
    for op, slot, times in ops:
        ok = refs[slot] > 0
        if op == "alloc" and a.num_free:
            got = a.allocate(1)
            assert got is not None
            refs[int(got[0])] = 1
        elif op == "retain" and ok:
            a.retain([slot] * times)
            refs[slot] += times
        elif op == "free" and ok and refs[slot] - times >= (1 if slot in pinned else 0):
            a.free([slot] * times)
            refs[slot] -= times
        elif op == "pin" and ok and slot not in pinned:
            a.pin([slot])
            refs[slot] += 1
            pinned.add(slot)
        elif op == "unpin" and slot in pinned:
            a.unpin([slot])
            refs[slot] -= 1
            pinned.discard(slot)
        a.check_invariants()
        assert a.num_reclaimable == sum(1 for s in pinned if refs[s] == 1)
        assert a.references(np.arange(8)).tolist() == refs
