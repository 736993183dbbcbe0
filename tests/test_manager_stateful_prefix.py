"""KVCacheManager with the prefix cache on, as a state machine: prompts drawn from a few shared
stems, prefix-cache hits, publishes, forks, suspended caches on host and disk, and pages shared
by requests and the cache, all under memory pressure (budgets at or near the plan floors).

After every rule: ``check_invariants()`` (manager and prefix index), and the fake engine reads
back every live token of every cache on every tier and every page the prefix index holds.
Every refusal (None / False / UsageError) must leave the manager byte-identical, the index
included; a refusal that simple arithmetic shows to be unjustified fails. Plain regression
tests follow the machine: the bugs reported in issue 9, and one the machine found.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from conftest import DISK, HOST, snapshot
from hybridkv.core.errors import UsageError
from hybridkv.core.types import GPU, TierId
from hybridkv.engine.fake import FakeEngine
from hybridkv.layouts.grouping import POOL_MODES
from hybridkv.layouts.spec import BufferSpec, LayerSpec, ModelLayout, attention_layer, ssm_layer
from hybridkv.lifecycles import Chunked, Encoder, Full, Sliding, Ssm, live_blocks
from hybridkv.manager.manager import KVCacheManager, ManagerConfig
from hybridkv.manager.prefix import PrefixCache
from hybridkv.manager.state import CacheLengths
from hybridkv.planning.planner import PlanSpec, plan
from stateful_common import ACTIVE, CLOSED, SUSPENDED, CacheModel, make_layer

I64 = npt.NDArray[np.int64]


# ---- the state machine ----------------------------------------------------------------------

LIFE_CYCLES = st.one_of(
    st.just(Full()),
    st.builds(Sliding, st.sampled_from([1, 3, 5, 8, 13]), st.sampled_from([0, 0, 1, 4])),
    st.builds(Chunked, st.sampled_from([3, 4, 8])),
    st.just(Ssm()),
    st.builds(Encoder, st.sampled_from([1, 5, 9])),
)


LAYERS = st.lists(st.builds(make_layer, LIFE_CYCLES, st.integers(1, 2)), min_size=2, max_size=3)  # hybrids
GPU_EXTRA = st.sampled_from([0.0, 0.1, 0.3, 1.0])  # at or near the floors: the cache must give way
HOST_TIER = st.sampled_from([0.3, 1.0, 2.0])  # lower-tier bytes as a share of the floors
DISK_TIER = st.sampled_from([0.0, 0.0, 0.5, 2.0])
STEMS = 2  # shared prompt stems: stem s, position i holds token 1000 * s + i


class PrefixMachine(CacheModel, RuleBasedStateMachine):
    """Requests keep a token array fixed at creation (a stem's first tokens, then their own
    tail), so a position's token id never changes and publish / open keys agree."""

    @initialize(layers=LAYERS, tpb=st.sampled_from([1, 2, 4]), max_seq_len=st.integers(4, 24),
                batch=st.integers(1, 3), gpu_extra=GPU_EXTRA, host=HOST_TIER, disk=DISK_TIER,
                max_active=st.integers(3, 6), offload_to_host=st.sampled_from([True, True, False]),
                pools=st.sampled_from(POOL_MODES))
    def setup(self, layers: list[LayerSpec], tpb: int, max_seq_len: int, batch: int, gpu_extra: float,
              host: float, disk: float, max_active: int, offload_to_host: bool, pools: str) -> None:
        self.build(layers, tpb, max_seq_len, batch, gpu_extra, host, disk, max_active, pools)
        self.pc = self.m.enable_prefix_cache(offload_to_host=offload_to_host)
        self.tpb = tpb
        self.has_ssm = any(isinstance(lg.life_cycle, Ssm) for lg in self.m.grouped.layer_groups)
        self.tokens: dict[int, I64] = {}
        self.serial = 0

    # ---- helpers ---------------------------------------------------------------------------
    def request_tokens(self, stem: int, cut: int, prefix: I64 | None = None) -> I64:
        """Token ids of a new request: ``prefix`` (a fork's shared tokens) or the first ``cut``
        tokens of a stem, then a tail no other request has."""
        self.serial += 1
        out: I64 = 1_000_000 * self.serial + np.arange(self.max_seq_len, dtype=np.int64)
        head = 1000 * stem + np.arange(cut, dtype=np.int64) if prefix is None else prefix
        out[:head.size] = head
        return out

    def row_free(self) -> bool:
        return len(self.handles(ACTIVE)) < self.m.config.max_active_requests

    def frozen(self) -> dict[str, Any]:
        """Everything a refusal must leave alone: ``snapshot(m)`` plus the prefix cache."""
        index = self.pc.index
        return {"manager": snapshot(self.m), "index.len": len(index),
                "index.places": sorted((e.key, e.layer_group, e.slot, e.tier) for e in index.entries()),
                "index.entries": sorted(index.entries()), "prefix.stats": copy.deepcopy(vars(self.pc.stats))}

    def unchanged(self, before: dict[str, Any]) -> None:
        after = self.frozen()
        for key in before:
            assert after[key] == before[key], f"a refused operation changed {key}"

    def free(self, tier: TierId) -> list[int]:
        return [a.num_free for a in self.m.tiers.allocators[tier]]

    def room(self, tier: TierId = GPU) -> list[int]:
        """Slots per pool group an operation can count on: free ones, plus pages only the
        prefix cache holds (it gives those up first)."""
        out = self.free(tier)
        for e in self.pc.index.entries():
            pg = self.m.grouped.layer_groups[e.layer_group].pool_group
            if e.tier == tier and int(self.m.tiers.allocators[tier][pg].references([e.slot])[0]) == 1:
                out[pg] += 1
        return out

    def fits(self, need: list[int], tier: TierId = GPU) -> bool:
        return all(n <= r for n, r in zip(need, self.room(tier), strict=True))

    def grown(self, batch: list[int], caps: list[int]) -> list[int]:
        """New slots per pool group the step allocates, freeing nothing: new tail blocks (never
        stale: history <= old capacity) and new SSM states. Shared pages make frees uncertain,
        so a refusal is judged only against these."""
        out = [0] * len(self.m.grouped.pool_groups)
        for lg in self.m.grouped.layer_groups:
            for h, c in zip(batch, caps, strict=True):
                old = self.lengths[h].capacity
                lc = lg.life_cycle
                if isinstance(lc, Ssm | Encoder):  # a state / the encoder blocks, from the first token
                    out[lg.pool_group] += int(old == 0 < c) * (1 if isinstance(lc, Ssm) else -(-lc.tokens // self.tpb))
                else:
                    out[lg.pool_group] += max(0, -(-c // self.tpb) - -(-old // self.tpb))
        return out

    def cache_pages(self, h: int) -> list[int]:
        """Pages per pool group of a cache: its live blocks (a hit or a fork holds exactly those)."""
        n, out = self.lengths[h], [0] * len(self.m.grouped.pool_groups)
        for lg in self.m.grouped.layer_groups:
            out[lg.pool_group] += int(live_blocks(lg.life_cycle, n.capacity, n.history, self.tpb))
        return out

    def released_before(self, donor: int, tokens: int) -> bool:
        """Whether a window group of ``donor`` already released a block a cache of history
        ``tokens`` needs (sink blocks and blocks from keep_start(tokens) on)."""
        hist = self.lengths[donor].history
        for lg in self.m.grouped.layer_groups:
            lc = lg.life_cycle
            if isinstance(lc, Ssm | Full | Encoder):  # never released
                continue
            first = lc.sink_blocks(self.tpb)
            stop = max(int(lc.keep_start(hist)) // self.tpb, first)  # donor's released [first, stop)
            if max(first, int(lc.keep_start(tokens)) // self.tpb) < min(stop, -(-tokens // self.tpb)):
                return True
        return False

    # ---- rules -----------------------------------------------------------------------------
    @rule(active=st.booleans(), priority=st.integers(0, 2), stem=st.integers(0, STEMS - 1), data=st.data())
    def open(self, active: bool, priority: int, stem: int, data: st.DataObject) -> None:
        tokens = self.request_tokens(stem, data.draw(st.integers(0, self.max_seq_len), label="cut"))
        if not active:
            h = self.m.create(priority)
        else:
            before = self.frozen()
            opened = self.m.open(priority)
            if opened is None:
                assert not self.row_free()
                self.unchanged(before)
                return
            h = opened
        assert h == len(self.state)
        self.state[h], self.lengths[h], self.tokens[h] = ACTIVE if active else SUSPENDED, CacheLengths(0, 0, 0), tokens

    def open_prompt(self, data: st.DataObject, stem: int) -> tuple[int, int, int] | None:
        """Open a prompt from a shared stem through the cache: (handle, reused, prompt tokens)."""
        n = self.max_seq_len
        tokens = self.request_tokens(stem, data.draw(st.just(n) | st.integers(0, n), label="cut"))
        # a few popular lengths (same prompt, same history: shared pages released in one step)
        popular = sorted({n, max(1, n // 2), max(1, n // 2 // self.tpb * self.tpb)})
        plen = data.draw(st.sampled_from(popular) | st.integers(1, n), label="prompt tokens")
        prompt = tokens[:plen]
        expect, row_free, empty = self.pc.probe(prompt), self.row_free(), len(self.pc.index) == 0
        before = self.frozen()
        opened = self.fake.open_with_prefix(prompt)
        if opened is None:
            assert not (row_free and empty), "open refused with a free row and nothing to reuse"
            self.unchanged(before)
            return None
        h, reused = opened
        assert row_free and h == len(self.state)
        assert reused == expect and reused % self.tpb == 0 and reused < plen
        self.state[h], self.lengths[h], self.tokens[h] = ACTIVE, CacheLengths(reused, reused, reused), tokens
        return h, reused, plen

    @rule(data=st.data(), stem=st.integers(0, STEMS - 1))
    def open_with_prefix(self, data: st.DataObject, stem: int) -> None:
        self.open_prompt(data, stem)

    @precondition(lambda self: self.row_free())
    @rule(data=st.data(), stem=st.integers(0, STEMS - 1))
    def serve(self, data: st.DataObject, stem: int) -> None:
        """The engine's admission path: open a prompt through the cache, prefill the rest in
        one chunk, publish what it computed, then (maybe) catch history up and commit."""
        opened = self.open_prompt(data, stem)
        if opened is None:
            return
        h, reused, plen = opened
        self.consistent()
        if not self.try_step([h], [plen], [reused]):
            return
        self.consistent()
        self.checked_publish(h, plen)
        if data.draw(st.booleans(), label="commit"):
            self.consistent()
            if self.try_step([h], [plen], [plen]):
                self.m.commit(h, plen)
                self.lengths[h] = CacheLengths(plen, plen, plen)

    def try_step(self, batch: list[int], caps: list[int], hists: list[int]) -> bool:
        """Step through the fake engine; a refusal must change nothing and must be justified."""
        fits = self.fits(self.grown(batch, caps))
        before = self.frozen()
        if not self.fake.step(batch, caps, hists):
            assert not fits, f"step refused though its new slots {self.grown(batch, caps)} fit {self.room()}"
            self.unchanged(before)
            return False
        for h, c, hist in zip(batch, caps, hists, strict=True):
            self.lengths[h] = CacheLengths(c, hist, self.lengths[h].committed)
        return True

    @precondition(lambda self: self.handles(ACTIVE))
    @rule(times=st.integers(1, 4))
    def decode(self, times: int) -> None:
        """A few decode steps of every active request in lockstep (caches that share pages then
        release them in the same step)."""
        for i in range(times):
            if i:
                self.consistent()
            batch = [h for h in self.m.active_handles().tolist() if self.lengths[h].capacity < self.max_seq_len]
            if not self.try_step(batch, [self.lengths[h].capacity + 1 for h in batch],
                                 [self.lengths[h].capacity for h in batch]):
                return

    @precondition(lambda self: self.handles(ACTIVE))
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        """A random batch in random order: prefill chunks, decodes, kept or shrunk reservations."""
        batch = data.draw(st.permutations(self.handles(ACTIVE)).flatmap(
            lambda p: st.integers(1, len(p)).map(lambda k: p[:k])), label="batch")
        caps, hists = [], []
        for h in batch:
            old = self.lengths[h]
            hist = data.draw(st.sampled_from([old.capacity, old.history]) | st.integers(old.history, old.capacity),
                             label=f"history {h}")
            top = data.draw(st.sampled_from([hist, hist + 1, hist + 8, self.max_seq_len]), label=f"top {h}")
            caps.append(data.draw(st.integers(hist, min(top, self.max_seq_len)), label=f"capacity {h}"))
            hists.append(hist)
        self.try_step(batch, caps, hists)

    @precondition(lambda self: self.handles(ACTIVE, SUSPENDED))
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from(self.handles(ACTIVE, SUSPENDED)), label="handle")
        n = self.lengths[h]
        tokens = data.draw(st.just(n.history) | st.integers(n.committed, n.history), label="tokens")
        self.m.commit(h, tokens)
        self.lengths[h] = CacheLengths(n.capacity, n.history, tokens)

    def checked_publish(self, h: int, upto: int) -> None:
        """Publish through the fake engine: it returns the entries it added; a suspended cache adds none."""
        before = self.frozen()
        entries = len(self.pc.index)
        pinned = self.fake.publish(h, self.tokens[h], upto)
        assert pinned == len(self.pc.index) - entries
        if self.state[h] is SUSPENDED:  # only an active cache's pages are published
            assert pinned == 0
            self.unchanged(before)

    @precondition(lambda self: self.handles(ACTIVE, SUSPENDED))
    @rule(data=st.data())
    def publish(self, data: st.DataObject) -> None:
        """Cache a request's computed full blocks (up to its capacity) under its token ids."""
        h = data.draw(st.sampled_from(3 * self.handles(ACTIVE) + self.handles(SUSPENDED)), label="handle")
        cap = self.lengths[h].capacity
        self.checked_publish(h, data.draw(st.just(cap) | st.integers(0, cap), label="upto"))

    @precondition(lambda self: self.row_free() and any(self.lengths[h].capacity for h in self.handles(ACTIVE)))
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        """A child sharing a donor's first committed tokens (parallel sampling, beam search)."""
        donor = data.draw(st.sampled_from([h for h in self.handles(ACTIVE) if self.lengths[h].capacity]),
                          label="donor")
        n = self.lengths[donor]
        if data.draw(st.booleans(), label="parallel sampling"):
            # the engine computed the whole reservation and commits it, then forks samples that
            # decode in lockstep with the donor: pages they share go stale in the same step
            if n.history < n.capacity and not self.try_step([donor], [n.capacity], [n.capacity]):
                return
            self.consistent()
            self.m.commit(donor, n.capacity)
            n = self.lengths[donor] = CacheLengths(n.capacity, n.capacity, n.capacity)
        if not n.committed:
            return
        tokens = data.draw(st.just(n.committed) | st.integers(1, n.committed), label="tokens")
        # SSM state exists at one point only: a fork elsewhere is refused; one at history below
        # capacity (the state has moved on) may be refused, or must hand over the right state
        must_refuse = self.released_before(donor, tokens) or (self.has_ssm and tokens != n.history)
        may_refuse = must_refuse or (self.has_ssm and tokens != n.capacity)
        copies = [0] * len(self.m.grouped.pool_groups)  # a partial last block, each SSM state
        for lg in self.m.grouped.layer_groups:
            if not isinstance(lg.life_cycle, Encoder):  # encoder pages are shared, never copied
                copies[lg.pool_group] += 1 if isinstance(lg.life_cycle, Ssm) else int(tokens % self.tpb != 0)
        fits = self.row_free() and self.fits(copies)
        before = self.frozen()
        try:
            child = self.fake.fork(donor, tokens)
        except UsageError:
            assert may_refuse, f"fork({donor}, {tokens}) of {n} raised"
            self.unchanged(before)
            return
        if child is None:
            assert not fits, f"fork refused though a row and {copies} slots ({self.room()}) were free"
            self.unchanged(before)
            return
        assert not must_refuse, f"fork({donor}, {tokens}) of {n} served a prefix it does not hold"
        assert child == len(self.state)
        self.state[child], self.lengths[child] = ACTIVE, CacheLengths(tokens, tokens, tokens)
        self.tokens[child] = self.request_tokens(0, 0, self.tokens[donor][:tokens])

    @precondition(lambda self: self.handles(SUSPENDED))
    @rule(data=st.data(), tier=st.sampled_from([HOST, DISK]))
    def offload(self, data: st.DataObject, tier: TierId) -> None:
        h = data.draw(st.sampled_from(self.handles(SUSPENDED)), label="handle")
        cache = self.m.suspended[h]
        # free slots suffice; cached pages nobody uses on that tier may make room as well
        fits = cache.tier == tier or all(n <= f for n, f in zip(self.cache_pages(h), self.free(tier), strict=True))
        may_fit = fits or self.fits(self.cache_pages(h), tier)
        before = self.frozen()
        moved = self.m.offload(h, tier)
        assert moved or not fits, f"offload refused though {self.cache_pages(h)} pages fit {self.free(tier)} free"
        assert may_fit or not moved, f"offload of {self.cache_pages(h)} pages to {self.room(tier)} slots"
        if not moved:
            self.unchanged(before)
            return
        assert self.m.suspended[h].tier == tier

    @precondition(lambda self: self.handles(SUSPENDED))
    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        lower = [h for h in self.handles(SUSPENDED) if self.m.suspended[h].tier != GPU]
        h = data.draw(st.sampled_from(lower) if lower and data.draw(st.booleans(), label="from below")
                      else st.sampled_from(self.handles(SUSPENDED)), label="handle")
        on_gpu = self.m.suspended[h].tier == GPU
        fits = self.row_free() and (on_gpu or self.fits(self.cache_pages(h)))
        before = self.frozen()
        if not self.m.resume(h):
            assert not fits, "resume refused though a row and the pages were free"
            self.unchanged(before)
            return
        assert self.row_free()
        self.state[h] = ACTIVE

    # ---- after every rule ------------------------------------------------------------------
    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "m"):
            return
        m = self.m
        m.check_invariants()
        self.pc.index.check_invariants()
        self.fake.verify()
        assert sorted(m.active_handles().tolist()) == self.handles(ACTIVE)
        assert sorted(m.suspended) == self.handles(SUSPENDED)
        for h, s in self.state.items():
            assert m.state(h) is s
            if s is not CLOSED:
                assert m.lengths(h) == self.lengths[h]
        for p in m.stats().pools:
            assert p.total == p.free + p.in_use


def test_prefix_cache_state_machine(request: pytest.FixtureRequest) -> None:
    """Deterministic and without shrinking by default: a failure prints its (at most 40-rule)
    run in seconds instead of spending hypothesis' 5-minute shrink budget of CI time.
    ``--hypothesis-seed=N`` explores other runs and shrinks what it finds."""
    seeded = request.config.getoption("--hypothesis-seed") is not None
    phases = tuple(Phase) if seeded else (Phase.explicit, Phase.generate)
    run_state_machine_as_test(PrefixMachine, settings=settings(
        max_examples=300, stateful_step_count=40, deadline=None, derandomize=not seeded, database=None,
        phases=phases, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


# ---- regression tests ------------------------------------------------------------------------

def one_full_layer(gpu_slots: int, max_seq_len: int, host_slots: int) -> tuple[KVCacheManager, PrefixCache,
                                                                                FakeEngine]:
    """The issue's repro shape: one full-attention layer, 4-token blocks of 8-byte tokens
    (32-byte slots), batch 1, the prefix cache on."""
    lyr = LayerSpec(Full(), (BufferSpec("kv", 8),))
    m = KVCacheManager(plan(PlanSpec(ModelLayout("t", (lyr,)), gpu_slots * 32, max_seq_len, tokens_per_block=4,
                                     max_batch_size=1, host_bytes=host_slots * 32)))
    pc = m.enable_prefix_cache()
    return m, pc, FakeEngine(m)


def test_refused_step_would_fit_after_dropping_cached_pages_and_moving_a_suspended_cache() -> None:
    """Bug 1: a step needing 5 slots with 1 free, 2 cache-only pages and a 3-page suspended
    cache that fits the host was refused, after the prefix cache had already moved pages."""
    m, pc, e = one_full_layer(gpu_slots=8, max_seq_len=32, host_slots=3)
    a = m.open()
    assert a is not None and e.step([a], [8], [0])
    assert e.publish(a, np.arange(9), 8) == 2
    m.close(a)  # 2 cache-only pages
    e.forget(a)
    s = m.open()
    assert s is not None and e.step([s], [12], [0])
    m.suspend(s)  # 3 suspended pages on the GPU
    x = m.open()
    assert x is not None and e.step([x], [8], [0])
    assert m.tiers.free_slots(GPU) == [1] and m.tiers.free_slots(HOST) == [3]
    before = snapshot(m)
    stepped = e.step([x], [28], [8])
    if not stepped:
        assert snapshot(m) == before, "the refused step changed the manager"
    assert stepped, "5 slots exist: 1 free, 2 held only by the cache, 3 of s, which fits the host"
    m.check_invariants()
    pc.index.check_invariants()
    assert m.suspended[s].tier == HOST
    e.verify()


def test_shared_window_blocks_released_by_both_holders_in_one_step() -> None:
    """Bug 4: a page two caches drop in the same step lost one reference only (leaked)."""
    lay = ModelLayout("w", (attention_layer(1, 8, 1, Sliding(8)),))
    m = KVCacheManager(plan(PlanSpec(lay, 64 * 64, 32, tokens_per_block=4, max_batch_size=2)),
                       ManagerConfig(max_active_requests=4))
    e = FakeEngine(m)
    a = m.open()
    assert a is not None and e.step([a], [16], [0]) and e.step([a], [16], [16])
    m.commit(a, 16)  # window 8 at history 16: blocks 0, 1 released, 2, 3 live
    b = e.fork(a, 16)
    assert b is not None
    assert e.step([a, b], [24, 24], [16, 16])
    m.check_invariants()
    rows = m.row_of([a, b]).tolist()
    shared = m.rows.pages(rows[0], 0)[1][:2]
    assert [m.rows.pages(r, 0)[0][:2].tolist() for r in rows] == [[2, 3], [2, 3]]
    assert m.rows.pages(rows[1], 0)[1][:2].tolist() == shared.tolist()
    assert m.tiers.allocators[GPU][0].references(shared).tolist() == [2, 2]
    free = m.tiers.free_slots(GPU)[0]
    assert e.step([a, b], [25, 25], [24, 24])  # history 24: both windows leave blocks 2, 3 now
    assert all(2 not in m.rows.pages(r, 0)[0] and 3 not in m.rows.pages(r, 0)[0] for r in m.row_of([a, b]))
    m.check_invariants()
    e.verify()
    assert m.tiers.free_slots(GPU)[0] == free  # 2 shared pages back, 2 new ones for blocks 6


def test_fork_of_an_ssm_cache_after_a_decode_step() -> None:
    """Bug 5: at capacity 5, history 4 the SSM state has seen 5 tokens; a fork at 4 must refuse
    (UsageError, nothing changed) or hand over a state at 4 tokens, never the state at 5."""
    lay = ModelLayout("s", (ssm_layer(8, 8, 1, 1), attention_layer(1, 8, 1, Full())))
    m = KVCacheManager(plan(PlanSpec(lay, 64 * 64, 32, tokens_per_block=4, max_batch_size=2)),
                       ManagerConfig(max_active_requests=4))
    e = FakeEngine(m)
    a = m.open()
    assert a is not None and e.step([a], [4], [0]) and e.step([a], [5], [4])
    m.commit(a, 4)
    before = snapshot(m)
    try:
        child = e.fork(a, 4)
    except UsageError:
        assert snapshot(m) == before
        m.check_invariants()
        return
    assert child is not None
    m.check_invariants()
    e.verify()  # the child's state must read as the state after 4 tokens


def test_open_keeps_the_host_pages_it_reuses_while_a_suspended_cache_moves_down() -> None:
    """A hit on a page cached on the host, with the GPU full of a suspended cache: making room
    moves that cache to the host, whose only room is cached pages, the hit's own among them.
    The open must serve the hit or refuse with nothing changed; it raised UsageError ("unpin of
    a slot that is not pinned") after moving the suspended cache and creating the request."""
    m, pc, e = one_full_layer(gpu_slots=2, max_seq_len=8, host_slots=2)
    t = np.arange(8)
    a = m.open()
    assert a is not None and e.step([a], [8], [0])
    assert e.publish(a, t, 8) == 2
    m.close(a)  # 2 cache-only pages on the GPU
    e.forget(a)
    b = m.open()
    assert b is not None and e.step([b], [8], [0])  # the cache moves both pages to the host (now full)
    m.suspend(b)  # the GPU is full of b's 2 pages
    assert sorted((int(x.ordinal), x.tier) for x in pc.index.entries()) == [(0, HOST), (1, HOST)]
    before = snapshot(m)
    opened = e.open_with_prefix(t[:5])  # hits block 0, on the host
    if opened is None:
        assert snapshot(m) == before
    m.check_invariants()
    e.verify()
