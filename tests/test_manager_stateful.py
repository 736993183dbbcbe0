"""KVCacheManager as a state machine: random small hybrid layouts, budgets at the plan floors,
random batches of prefills / decodes / reservations, suspend, resume, offload, close, misuse.

After every rule: ``check_invariants()``, the fake engine reads back every live token on every
tier, and the manager's lengths and states match a plain model. Every refusal (None / False /
UsageError) must leave a byte-identical snapshot, and a refusal must be justified: a step whose
net new pages fit the free GPU slots, or an offload that fits its tier, has to succeed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
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
from hybridkv.layouts.grouping import POOL_MODES
from hybridkv.layouts.spec import LayerSpec
from hybridkv.lifecycles import Chunked, Encoder, Full, Sliding, Ssm, live_blocks
from hybridkv.manager.state import CacheLengths
from stateful_common import ACTIVE, CLOSED, SUSPENDED, CacheModel, make_layer

LIFE_CYCLES = st.one_of(
    st.just(Full()),
    st.builds(Sliding, st.sampled_from([1, 2, 3, 5, 8, 13]), st.sampled_from([0, 0, 1, 3, 4])),
    st.builds(Chunked, st.sampled_from([1, 3, 4, 8, 10])),
    st.just(Ssm()),
    st.builds(Encoder, st.sampled_from([1, 5, 9])),
)


LAYERS = st.lists(st.builds(make_layer, LIFE_CYCLES, st.integers(1, 2)), min_size=1, max_size=4)
GPU_EXTRA = st.sampled_from([0.0, 0.0, 0.1, 0.3])  # budgets at or near the floors
LOWER_TIER = st.sampled_from([0.0, 0.3, 1.0, 2.0])  # host / disk bytes as a share of the floors


class ManagerMachine(CacheModel, RuleBasedStateMachine):
    """Storage options come from ``storage_options()``: NumPy here, torch in the subclasses."""

    storage_options: ClassVar[Callable[[], dict[str, Any]]] = dict

    @initialize(layers=LAYERS, tpb=st.sampled_from([1, 2, 4, 8]), max_seq_len=st.integers(1, 48),
                batch=st.integers(1, 4), gpu_extra=GPU_EXTRA, host=LOWER_TIER, disk=LOWER_TIER,
                max_active=st.integers(1, 6), pools=st.sampled_from(POOL_MODES))
    def setup(self, layers: list[LayerSpec], tpb: int, max_seq_len: int, batch: int, gpu_extra: float,
              host: float, disk: float, max_active: int, pools: str) -> None:
        self.build(layers, tpb, max_seq_len, batch, gpu_extra, host, disk, max_active, pools,
                   **type(self).storage_options())

    # ---- helpers ---------------------------------------------------------------------------
    def unchanged(self, before: dict[str, Any]) -> None:
        assert snapshot(self.m) == before

    def free(self, tier: TierId) -> list[int]:
        return [a.num_free for a in self.m.tiers.allocators[tier]]

    def pages(self, c_old: Any, h_old: Any, c_new: Any, h_new: Any) -> list[int]:
        """Net new slots per pool group for moving requests from (c_old, h_old) to (c_new, h_new)."""
        out = [0] * len(self.m.grouped.pool_groups)
        tpb = self.m.tokens_per_block
        for lg in self.m.grouped.layer_groups:
            lc = lg.life_cycle
            out[lg.pool_group] += int((live_blocks(lc, c_new, h_new, tpb) - live_blocks(lc, c_old, h_old, tpb)).sum())
        return out

    def cache_pages(self, h: int) -> list[int]:
        n = self.lengths[h]
        return self.pages(0, 0, n.capacity, n.history)

    # ---- rules -----------------------------------------------------------------------------
    @rule(active=st.booleans(), priority=st.integers(0, 2))
    def open(self, active: bool, priority: int) -> None:
        if not active:
            h = self.m.create(priority)
            self.state[h], self.lengths[h] = SUSPENDED, CacheLengths(0, 0, 0)
            return
        before = snapshot(self.m)
        h = self.m.open(priority)
        if h is None:
            assert len(self.handles(ACTIVE)) == self.m.config.max_active_requests
            self.unchanged(before)
            return
        assert h == len(self.state)
        self.state[h], self.lengths[h] = ACTIVE, CacheLengths(0, 0, 0)

    def try_step(self, batch: list[int], caps: list[int], hists: list[int]) -> None:
        """Step through the fake engine; a refusal must change nothing and must be justified."""
        old_c = np.array([self.lengths[h].capacity for h in batch], np.int64)
        old_h = np.array([self.lengths[h].history for h in batch], np.int64)
        need = self.pages(old_c, old_h, np.array(caps, np.int64), np.array(hists, np.int64))
        fits = all(n <= f for n, f in zip(need, self.free(GPU), strict=True))
        before = snapshot(self.m)
        if not self.fake.step(batch, caps, hists):
            assert not fits, f"step refused though {need} new slots fit {self.free(GPU)} free"
            self.unchanged(before)
            return
        for h, c, hist in zip(batch, caps, hists, strict=True):
            self.lengths[h] = CacheLengths(c, hist, self.lengths[h].committed)

    @precondition(lambda self: self.handles(ACTIVE))
    @rule()
    def decode(self) -> None:
        """Every active request (in row order) computes its last token and reserves one more."""
        batch = [h for h in self.m.active_handles().tolist() if self.lengths[h].capacity < self.max_seq_len]
        self.try_step(batch, [self.lengths[h].capacity + 1 for h in batch],
                      [self.lengths[h].capacity for h in batch])

    @precondition(lambda self: self.handles(ACTIVE))
    @rule(data=st.data(), tokens=st.integers(1, 24))
    def prefill(self, data: st.DataObject, tokens: int) -> None:
        """One request computes what it reserved and reserves a chunk of ``tokens`` more."""
        h = data.draw(st.sampled_from(self.handles(ACTIVE)), label="handle")
        old = self.lengths[h]
        self.try_step([h], [min(self.max_seq_len, old.capacity + tokens)], [old.capacity])

    @precondition(lambda self: self.handles(ACTIVE))
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        """A random batch in random order: any history the old capacity allows, any new
        capacity up to max_seq_len (growing, keeping or shrinking the reservation)."""
        batch = data.draw(st.permutations(self.handles(ACTIVE)).flatmap(
            lambda p: st.integers(0, len(p)).map(lambda k: p[:k])), label="batch")
        caps, hists = [], []
        for h in batch:
            old = self.lengths[h]
            hist = data.draw(st.integers(old.history, old.capacity), label=f"history {h}")
            top = data.draw(st.sampled_from([hist + 1, hist + 8, self.max_seq_len]), label=f"top {h}")
            caps.append(data.draw(st.integers(hist, min(top, self.max_seq_len)), label=f"capacity {h}"))
            hists.append(hist)
        self.try_step(batch, caps, hists)

    @precondition(lambda self: len(self.handles(ACTIVE)) >= 2)
    @rule(data=st.data(), tokens=st.integers(4, 48))
    def preempt(self, data: st.DataObject, tokens: int) -> None:
        """The scheduler's move: suspend one request so another can prefill a long chunk, which
        may evict suspended caches to a lower tier."""
        victim, runner = data.draw(st.permutations(self.handles(ACTIVE)), label="victim, runner")[:2]
        self.m.suspend(victim)
        self.state[victim] = SUSPENDED
        old = self.lengths[runner]
        self.try_step([runner], [min(self.max_seq_len, old.capacity + tokens)], [old.capacity])

    @precondition(lambda self: self.handles(ACTIVE, SUSPENDED))
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from(self.handles(ACTIVE, SUSPENDED)), label="handle")
        n = self.lengths[h]
        tokens = data.draw(st.integers(n.committed, n.history), label="tokens")
        self.m.commit(h, tokens)
        self.lengths[h] = CacheLengths(n.capacity, n.history, tokens)

    def try_resume(self, h: int) -> None:
        tier = self.m.suspended[h].tier
        row_free = len(self.handles(ACTIVE)) < self.m.config.max_active_requests
        fits = tier == GPU or all(n <= f for n, f in zip(self.cache_pages(h), self.free(GPU),
                                                               strict=True))
        before = snapshot(self.m)
        if not self.m.resume(h):
            assert not (row_free and fits), "resume refused though a row and the pages were free"
            self.unchanged(before)
            return
        assert row_free
        self.state[h] = ACTIVE

    @precondition(lambda self: self.handles(SUSPENDED))
    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        self.try_resume(data.draw(st.sampled_from(self.handles(SUSPENDED)), label="handle"))

    @precondition(lambda self: any(c.tier != GPU for c in self.m.suspended.values()))
    @rule(data=st.data())
    def resume_from_lower_tier(self, data: st.DataObject) -> None:
        """Bring a cache back from host or disk, evicting others if the GPU is short."""
        lower = sorted(h for h, c in self.m.suspended.items() if c.tier != GPU)
        self.try_resume(data.draw(st.sampled_from(lower), label="handle"))

    @precondition(lambda self: self.handles(SUSPENDED))
    @rule(data=st.data(), tier=st.sampled_from([HOST, DISK, GPU]))
    def offload(self, data: st.DataObject, tier: TierId) -> None:
        h = data.draw(st.sampled_from(self.handles(SUSPENDED)), label="handle")
        cache = self.m.suspended[h]
        before = snapshot(self.m)
        if tier == GPU:  # offload only moves down; resume() brings pages up
            with pytest.raises(UsageError):
                self.m.offload(h, tier)
            self.unchanged(before)
            return
        fits = cache.tier == tier or all(n <= f for n, f in zip(self.cache_pages(h), self.free(tier), strict=True))
        moved = self.m.offload(h, tier)
        assert moved is fits
        if not moved:
            self.unchanged(before)
            return
        assert self.m.suspended[h].tier == tier

    @precondition(lambda self: self.state)
    @rule(data=st.data())
    def misuse(self, data: st.DataObject) -> None:
        m, cases = self.m, [lambda: m.step([len(self.state) + 3], [1], [0])]
        for h in self.handles(SUSPENDED, CLOSED):
            cases += [lambda h=h: m.step([h], [1], [0]), lambda h=h: m.suspend(h)]
        for h in self.handles(CLOSED):
            cases += [lambda h=h: m.close(h), lambda h=h: m.resume(h), lambda h=h: m.commit(h, 0)]
        for h in self.handles(ACTIVE):
            c, hist, com = self.lengths[h].capacity, self.lengths[h].history, self.lengths[h].committed
            cases += [lambda h=h, c=c, hist=hist: m.step([h, h], [c, c], [hist, hist]),
                      lambda h=h, c=c, hist=hist: m.step([h], [c + 1, c], [hist]),
                      lambda h=h, c=c: m.step([h], [c + 1], [c + 1]),
                      lambda h=h, c=c: m.step([h], [self.max_seq_len + 1], [c]),
                      lambda h=h, hist=hist: m.commit(h, hist + 1),
                      lambda h=h: m.resume(h), lambda h=h: m.offload(h, HOST)]
            if hist:
                cases += [lambda h=h, c=c, hist=hist: m.step([h], [c], [hist - 1])]
            if com:
                cases += [lambda h=h, com=com: m.commit(h, com - 1)]
            if c > hist:
                cases += [lambda h=h, c=c, hist=hist: m.step([h], [c - 1], [c])]
        call = data.draw(st.sampled_from(cases), label="misuse")
        before = snapshot(self.m)
        with pytest.raises(UsageError):
            call()
        self.unchanged(before)

    # ---- after every rule ------------------------------------------------------------------
    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "m"):
            return
        m = self.m
        m.check_invariants()
        self.fake.verify()
        assert m.active_handles().tolist() == sorted(m.active_handles().tolist(),
                                                     key=lambda h: int(m.row_of([h])[0]))
        assert sorted(m.active_handles().tolist()) == self.handles(ACTIVE)
        assert sorted(m.suspended) == self.handles(SUSPENDED)
        for h, s in self.state.items():
            assert m.state(h) is s
            if s is not CLOSED:
                assert m.lengths(h) == self.lengths[h]
        stats = m.stats()
        assert (stats.active_requests, stats.suspended_requests) == (len(self.handles(ACTIVE)),
                                                                     len(self.handles(SUSPENDED)))
        for p in stats.pools:
            assert p.total == p.free + p.in_use and 0 <= p.evictable <= p.in_use <= p.peak_in_use
        for tier in m.tiers.ids:
            held = [0] * len(m.grouped.pool_groups)
            for h in self.handles(ACTIVE, SUSPENDED):
                on = GPU if self.state[h] is ACTIVE else m.suspended[h].tier
                if on is tier:
                    held = [a + b for a, b in zip(held, self.cache_pages(h), strict=True)]
            assert [stats.pool(g, tier).in_use for g in range(len(held))] == held


def torch_cpu() -> dict[str, Any]:
    from hybridkv.storage.torch_backend import TorchCopyEngine

    return {"gpu_backend": "torch", "gpu_options": {"device": "cpu"}, "host_backend": "torch",
            "copy_engine": TorchCopyEngine()}


def torch_cuda() -> dict[str, Any]:
    from hybridkv.storage.torch_backend import TorchCopyEngine

    return {"gpu_backend": "torch", "gpu_options": {"device": "cuda"}, "host_backend": "torch",
            "host_options": {"pin_memory": True}, "copy_engine": TorchCopyEngine()}


class TorchCPUMachine(ManagerMachine):
    storage_options = staticmethod(torch_cpu)


class TorchCUDAMachine(ManagerMachine):
    storage_options = staticmethod(torch_cuda)


def run(machine: type[RuleBasedStateMachine], examples: int, steps: int = 50) -> None:
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


def test_manager_state_machine_numpy() -> None:
    run(ManagerMachine, 300)


def test_manager_state_machine_torch_cpu() -> None:
    pytest.importorskip("torch")
    run(TorchCPUMachine, 60)


@pytest.mark.cuda
def test_manager_state_machine_torch_cuda() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    run(TorchCUDAMachine, 30)
