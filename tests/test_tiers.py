"""Tiers as data: the tier list and its validation, the backend registry, and a slow tier
(storage/delayed.py) whose jobs finish later: a suspension to it returns at once, steps of
other requests run and never wait for it, its pages read back byte-identical, invariants hold
after every step.

One full-attention layer, 64 B slots at tpb 4, 12 GPU slots; tiers: gpu, host (the plan's
host share, 0 here unless asked), remote (the delayed backend, 12 slots).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from conftest import snapshot
from hybridkv.core.errors import ConfigError, UsageError
from hybridkv.core.types import GPU, LayerGroupId, TierId
from hybridkv.engine.fake import FakeEngine
from hybridkv.layouts.spec import ModelLayout, attention_layer
from hybridkv.lifecycles import Full
from hybridkv.manager.manager import KVCacheManager, ManagerConfig
from hybridkv.manager.tiers import StorageConfig, TierSpec
from hybridkv.planning.planner import PlanSpec, plan
from hybridkv.reuse.events import BlockRemoved, EventBatch
from hybridkv.storage.backends import make_buffer, register_backend, registered_backends
from hybridkv.storage.delayed import DelayedBuffer
from hybridkv.storage.jobs import JobId

REMOTE = TierId(2)
LAYOUT = ModelLayout("test", (attention_layer(1, 8, 1, Full()),))


def build(delay_polls: int | None = None, host_bytes: int = 0) -> KVCacheManager:
    p = plan(PlanSpec(LAYOUT, 12 * 64, 32, tokens_per_block=4, max_batch_size=1, host_bytes=host_bytes))
    tiers = (TierSpec("host"), TierSpec("remote", "delayed", 12 * 64, {"delay_polls": delay_polls}))
    return KVCacheManager(p, ManagerConfig(max_active_requests=4, storage=StorageConfig(lower_tiers=tiers)))


@pytest.fixture
def m() -> Iterator[KVCacheManager]:
    made = build()
    yield made
    made.close_storage()


def remote(m: KVCacheManager) -> DelayedBuffer:
    buf = m.tiers.buffers[REMOTE][0]
    assert isinstance(buf, DelayedBuffer)
    return buf


def in_use(m: KVCacheManager) -> list[int]:
    return [m.tiers.allocators[t][0].num_in_use for t in m.tiers.ids]


def ok(fake: FakeEngine, handles: list[int], capacity: list[int], history: list[int]) -> None:
    assert fake.step(handles, capacity, history)
    fake.m.check_invariants()
    assert fake.verify() > 0


def suspended_to_remote(m: KVCacheManager, fake: FakeEngine) -> tuple[int, int]:
    """a: 12 tokens (3 pages), b: 20 tokens (5 pages) suspended and sent to the remote tier."""
    a, b = m.open(), m.open()
    assert a is not None and b is not None
    ok(fake, [a, b], [12, 20], [0, 0])
    m.suspend(b)
    assert m.offload(b, "remote") is True  # returns at once: the store is a pending job
    m.check_invariants()
    return a, b


def test_the_tier_list_is_data(m: KVCacheManager) -> None:
    assert m.tiers.names == ["gpu", "host", "remote"] and m.tiers.ids == [0, 1, 2]
    assert m.tiers.immediate == [True, True, False]
    assert [[a.num_slots for a in m.tiers.allocators[t]] for t in m.tiers.ids] == [[12], [0], [12]]
    assert m.tiers.tier_id("remote") == REMOTE
    with pytest.raises(UsageError, match="no tier named 'disk'; tiers: gpu, host, remote"):
        m.tiers.tier_id("disk")
    local = StorageConfig.local(disk_bytes=4 * 64)
    assert [(t.name, t.backend, t.bytes) for t in local.lower_tiers] == [("host", "numpy", None), ("disk", "disk", 256)]
    assert StorageConfig().lower_tiers == StorageConfig.local().lower_tiers


def test_bad_tier_lists_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"StorageConfig.lower_tiers\[1\].backend \('far'\): unknown storage "
                                          r"backend 'nfs'; registered: delayed, disk, numpy, torch"):
        StorageConfig(lower_tiers=(TierSpec("host"), TierSpec("far", "nfs", 0)))
    with pytest.raises(ConfigError, match=r"StorageConfig.gpu_backend: unknown storage backend 'cuda'"):
        StorageConfig(gpu_backend="cuda")
    with pytest.raises(ConfigError, match="tier name 'host' is used twice"):
        StorageConfig(lower_tiers=(TierSpec("host"), TierSpec("host", bytes=0)))
    with pytest.raises(ConfigError, match="tier name 'gpu' is used twice"):
        StorageConfig(lower_tiers=(TierSpec("gpu"),))
    with pytest.raises(ConfigError, match=r"lower_tiers\[1\] \('disk'\): only the first lower tier takes the plan's"):
        StorageConfig(lower_tiers=(TierSpec("host"), TierSpec("disk", "disk")))
    with pytest.raises(ConfigError, match="lower tier 'disk': bytes must be >= 0, got -1"):
        TierSpec("disk", "disk", -1)
    with pytest.raises(ConfigError, match="delay_polls must be >= 1 or None, got 0"):
        DelayedBuffer(1, 8, delay_polls=0)


def test_backends_come_from_the_registry() -> None:
    assert {"numpy", "disk", "torch", "delayed"} <= set(registered_backends())
    buf = make_buffer("delayed", 2, 8, delay_polls=2)
    assert isinstance(buf, DelayedBuffer) and buf.delay_polls == 2
    register_backend("delayed", DelayedBuffer)  # the same factory again: harmless (a re-import)
    with pytest.raises(ConfigError, match="storage backend 'delayed' is registered already"):
        register_backend("delayed", make_buffer)


def test_offload_names_a_lower_tier(m: KVCacheManager) -> None:
    h = m.open()
    assert h is not None and m.resize(h, 4)
    m.suspend(h)
    with pytest.raises(UsageError, match=r"moves pages down to a lower tier \(host, remote\)"):
        m.offload(h, GPU)
    with pytest.raises(UsageError, match=r"moves pages down to a lower tier"):
        m.offload(h, TierId(3))
    with pytest.raises(UsageError, match="no tier named 'disk'"):
        m.offload(h, "disk")
    assert m.offload(h) is False  # down the list to a local tier with room: the host has none
    assert m.suspended[h].tier == GPU and not m.moving


def test_a_step_never_waits_for_a_store(m: KVCacheManager) -> None:
    fake = FakeEngine(m)
    a, b = suspended_to_remote(m, fake)
    # the GPU pages stay reserved while the remote tier may still read them
    assert in_use(m) == [8, 0, 5] and m.suspended[b].tier == GPU and list(m.moving) == [b]
    assert len(remote(m).pending) == 1 and m.ready(b) is False
    before = snapshot(m)
    assert m.resume(b) is False and m.offload(b, "host") is False  # in flight: refused, nothing changed
    assert snapshot(m) == before
    ok(fake, [a], [16], [12])  # the other request's steps run; each polls once, nothing waits
    ok(fake, [a], [20], [16])
    assert remote(m).polls == 2 and list(m.moving) == [b] and in_use(m) == [10, 0, 5]
    # a step that needs the reserved pages is short, not blocked, and changes nothing
    before = snapshot(m)
    assert m.try_step([a], [32], [20]).short == [1]
    assert snapshot(m) == before
    remote(m).release()
    ok(fake, [a], [32], [20])  # polls first: the store finished, its 5 GPU pages are free again
    assert not m.moving and m.suspended[b].tier == REMOTE and in_use(m) == [8, 0, 5]
    assert m.stats().counters.offloads == 1 and m.tiers.bytes_moved[(GPU, REMOTE)] == 5 * 64


def test_a_resume_from_the_slow_tier_starts_a_load(m: KVCacheManager) -> None:
    fake = FakeEngine(m)
    a, b = suspended_to_remote(m, fake)
    remote(m).release()
    assert m.poll() == 1 and m.poll() == 0
    assert m.ready(b) is False  # on a tier whose loads finish later
    m.close(a)
    fake.forget(a)
    assert m.resume(b) is False  # the load started: GPU slots reserved, b still suspended
    assert list(m.moving) == [b] and in_use(m) == [5, 0, 5] and m.suspended[b].tier == REMOTE
    m.check_invariants()
    fake.verify()  # b's pages still read back from the remote tier
    c = m.open()
    assert c is not None
    ok(fake, [c], [8], [0])  # other requests step while the load is pending
    assert list(m.moving) == [b]
    remote(m).release()
    ok(fake, [c], [12], [8])  # the poll lands b on the GPU: the bytes came back identical
    assert not m.moving and m.suspended[b].tier == GPU and in_use(m) == [8, 0, 0]
    assert m.ready(b) and m.resume(b)
    ok(fake, [b, c], [24, 16], [20, 12])
    assert m.stats().counters.onboards == 1 and m.tiers.bytes_moved[(REMOTE, GPU)] == 5 * 64


def test_jobs_finish_after_delay_polls() -> None:
    m = build(delay_polls=3)
    fake = FakeEngine(m)
    a, b = suspended_to_remote(m, fake)
    ok(fake, [a], [13], [12])
    ok(fake, [a], [14], [13])
    assert list(m.moving) == [b] and remote(m).polls == 2
    ok(fake, [a], [15], [14])  # the third poll finishes the store
    assert not m.moving and m.suspended[b].tier == REMOTE and remote(m).polls == 3
    ok(fake, [a], [16], [15])
    assert remote(m).polls == 3  # nothing in flight: steps do not poll
    m.close_storage()


def test_closing_a_cache_in_flight_frees_its_slots_when_the_jobs_finish(m: KVCacheManager) -> None:
    fake = FakeEngine(m)
    a, b = suspended_to_remote(m, fake)
    m.close(b)
    fake.forget(b)
    assert in_use(m) == [8, 0, 5] and len(m.orphaned) == 1  # the tier may still read b's GPU pages
    m.check_invariants()
    ok(fake, [a], [16], [12])
    assert in_use(m) == [9, 0, 5]
    remote(m).release()
    assert m.poll() == 1
    assert in_use(m) == [4, 0, 0] and not m.orphaned
    m.check_invariants()


def test_making_room_uses_only_local_tiers() -> None:
    """Eviction to make GPU room needs the slots in this step: a store to a slow tier would
    free them only later, so a suspended cache moves to the host or not at all."""
    for host_bytes, short in ((0, [1]), (12 * 64, [0])):
        m = build(host_bytes=host_bytes)
        fake = FakeEngine(m)
        a, b = m.open(), m.open()
        assert a is not None and b is not None
        ok(fake, [a, b], [16, 20], [0, 0])
        m.suspend(b)
        # a needs 4 more pages, 3 are free: b must leave the GPU now
        assert m.shortfall([a], [32], [16]) == short and not m.moving
        if host_bytes:
            ok(fake, [a], [32], [16])
            assert m.suspended[b].tier == TierId(1) and not m.moving and in_use(m) == [8, 5, 0]
            assert m.offload(b) is True and m.suspended[b].tier == TierId(1)  # already on a local tier
        m.close_storage()


def test_events_name_the_managers_tiers() -> None:
    batch = EventBatch(3, (BlockRemoved((b"\x01" * 32,), REMOTE, LayerGroupId(0)),))
    text = batch.to_json(["gpu", "host", "remote"])
    assert '"tier":"remote"' in text and EventBatch.from_json(text, ["gpu", "host", "remote"]) == batch
    with pytest.raises(UsageError, match="KV event on unknown tier 'remote'; tiers: gpu, host, disk"):
        EventBatch.from_json(text)


def test_delayed_buffer_moves_bytes_only_when_a_job_finishes() -> None:
    src = make_buffer("numpy", 4, 8)
    src.write(np.array([1, 2], np.int32), np.full((2, 8), 7, np.uint8))
    far = DelayedBuffer(4, 8, delay_polls=2)
    assert far.store(JobId(5), src, np.array([1, 2], np.int32), np.array([0, 3], np.int32)) is False
    src.write(np.array([1], np.int32), np.full((1, 8), 9, np.uint8))  # what a reused source slot would do
    assert far.finished() == [] and far.pending == [5]
    assert far.finished() == [5] and far.pending == []
    assert far.read(np.array([0, 3], np.int32)).tolist() == [[9] * 8, [7] * 8]  # read at completion
    with pytest.raises(UsageError, match="job 6 submitted twice"):
        far.load(JobId(6), np.array([0], np.int32), src, np.array([0], np.int32))
        far.load(JobId(6), np.array([0], np.int32), src, np.array([0], np.int32))


def _random_op(m: KVCacheManager, fake: FakeEngine, rng: np.random.Generator, tokens: dict[int, int]) -> None:
    """One random operation; ``tokens``: active handle -> capacity."""
    op, active, suspended = int(rng.integers(8)), sorted(tokens), sorted(m.suspended)
    if op == 0 and (h := m.open()) is not None:
        tokens[h] = 0
    elif op == 1 and active:
        h = int(rng.choice(active))
        new = min(32, tokens[h] + int(rng.integers(1, 9)))
        if fake.step([h], [new], [tokens[h]]):
            tokens[h] = new
    elif op == 2 and active:
        h = int(rng.choice(active))
        m.suspend(h)
        del tokens[h]
    elif op == 3 and suspended:
        m.offload(int(rng.choice(suspended)), str(rng.choice(["host", "remote"])))
    elif op == 4 and suspended:
        h = int(rng.choice(suspended))
        if m.resume(h):
            tokens[h] = m.lengths(h).capacity
    elif op == 5 and (active or suspended):
        h = int(rng.choice(active + suspended))
        m.close(h)
        fake.forget(h)
        tokens.pop(h, None)
    elif op == 6:
        remote(m).release()
    elif op == 7:
        m.poll()


def test_random_operations_with_a_slow_tier_keep_every_byte() -> None:
    m = build(host_bytes=4 * 64)
    fake, rng, tokens, most_in_flight = FakeEngine(m), np.random.default_rng(7), {}, 0
    for _ in range(600):
        _random_op(m, fake, rng, tokens)
        most_in_flight = max(most_in_flight, len(m.moving) + len(m.orphaned))
        m.check_invariants()
        fake.verify()
    remote(m).release()
    m.poll()
    m.check_invariants()
    fake.verify()
    c = m.stats().counters
    assert not m.moving and not m.orphaned and most_in_flight == 2
    assert (c.steps, c.suspends, c.resumes, c.offloads, c.onboards) == (57, 49, 92, 10, 7)
    m.close_storage()
