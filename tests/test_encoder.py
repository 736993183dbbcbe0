"""The encoder kind end to end: a fixed number of encoder tokens per request (cross-attention
caches of encoder-decoder and vision-language models), from layout JSON through the planner's
floors, the manager, the fake engine, forks and prefix reuse keyed by the encoder input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hybridkv.core.errors import ConfigError
from hybridkv.core.types import GPU
from hybridkv.engine.fake import FakeEngine
from hybridkv.layouts.json_format import parse_layout
from hybridkv.layouts.models import load_model
from hybridkv.layouts.spec import ModelLayout, attention_layer
from hybridkv.lifecycles import Encoder, Full, Sliding, live_blocks, worst_decode_blocks
from hybridkv.manager.manager import KVCacheManager, ManagerConfig
from hybridkv.planning.planner import PlanSpec, plan
from hybridkv.reuse import ReuseScope
from hybridkv.scheduler.request import SeqRequest, Status
from hybridkv.scheduler.scheduler import Scheduler, SchedulerConfig

TPB = 4
ENC = Encoder(10)  # 10 encoder tokens: 3 blocks of 4, the last holding 2


def test_kind_arithmetic() -> None:
    """ceil(10 / 4) = 3 blocks from the first token on, never more, never stale."""
    assert live_blocks(ENC, [0, 1, 5, 400], [0, 0, 4, 399], TPB).tolist() == [0, 3, 3, 3]
    assert ENC.stale_range(400, TPB).stop == 0
    assert worst_decode_blocks((ENC,), TPB, 1000) == 3
    assert worst_decode_blocks((ENC, Full()), TPB, 9) == 3 + 3  # blocks of tokens 0..8
    assert ENC.ideal_live_tokens(np.array([0, 3, 70])).tolist() == [0, 10, 10]
    assert ENC.last_page_tokens(np.array([0, 7]), TPB).tolist() == [0, 2]
    assert ENC.describe() == "encoder(10)"
    with pytest.raises(ConfigError, match="encoder tokens must be >= 1"):
        Encoder(0)


def test_layout_json(tmp_path: Path) -> None:
    data = {"name": "encdec", "layers": [
        {"type": "attention", "kv_bytes_per_token": 64, "count": 2},
        {"type": "encoder", "tokens": 1500, "kv_bytes_per_token": 64, "count": 2}]}
    layout = parse_layout(data, "m.json")
    assert [layer.life_cycle for layer in layout.layers] == [Full(), Full(), Encoder(1500), Encoder(1500)]
    assert layout.layers[2].kv_bytes_per_token == 64
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    assert load_model(str(path)).layers == layout.layers
    bad = {"name": "x", "layers": [{"type": "encoder", "kv_bytes_per_token": 64}]}
    with pytest.raises(ConfigError, match=r"layers\[0\]: missing field 'tokens'"):
        parse_layout(bad, "m.json")
    bad = {"name": "x", "layers": [{"type": "encoder", "tokens": 8, "window": 4, "kv_bytes_per_token": 64}]}
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['window'\] for type 'encoder'"):
        parse_layout(bad, "m.json")


def _layout() -> ModelLayout:
    # the full and encoder layers have equal slot bytes: one pool group shares their slot ids
    return ModelLayout("encdec", (attention_layer(1, 8, 2, Full()), attention_layer(1, 8, 2, Sliding(6)),
                                  attention_layer(1, 8, 2, ENC)))


def test_planner_floors_count_the_encoder_blocks() -> None:
    """All three layer groups have equal slot bytes: one pool group. One request of 40 tokens
    alone peaks at history 36: 10 full blocks, the window (6) spans blocks 7..9, 3 encoder
    blocks = 16. A concurrent decode at its worst: 1 full block, 3 window, 3 encoder = 7."""
    slot = 2 * 8 * 2 * TPB
    floors = {}
    for batch in (1, 4, 8):
        for pools in ("per-lifecycle", "shared"):
            p = plan(PlanSpec(_layout(), 400 * slot, 40, tokens_per_block=TPB, max_batch_size=batch, pools=pools))
            (pg,) = p.pool_groups
            floors[batch, pools] = pg.min_slots
    # shared pools reserve one request alone; per-lifecycle pools the concurrent decodes too
    assert floors == {(1, "per-lifecycle"): 16, (4, "per-lifecycle"): 4 * 7, (8, "per-lifecycle"): 8 * 7,
                      (1, "shared"): 16, (4, "shared"): 16, (8, "shared"): 16}
    brute = max(sum(int(live_blocks(lc, h + 1, h, TPB)) for lc in (Full(), Sliding(6), ENC)) for h in range(40))
    assert brute == 16


def _manager(gpu_slots: int = 120, host_slots: int = 60) -> tuple[KVCacheManager, FakeEngine]:
    slot = 2 * 8 * 2 * TPB
    p = plan(PlanSpec(_layout(), gpu_slots * slot * 2, 40, tokens_per_block=TPB, max_batch_size=2,
                      host_bytes=host_slots * slot * 2))
    m = KVCacheManager(p, ManagerConfig(max_active_requests=8))
    m.enable_prefix_cache()
    return m, FakeEngine(m)


def _encoder_pages(m: KVCacheManager, handle: int) -> list[int]:
    g = next(lg.id for lg in m.grouped.layer_groups if lg.life_cycle == ENC)
    return m.rows.pages(int(m.row_of([handle])[0]), g)[1].tolist()


def test_manager_holds_the_encoder_for_the_whole_request_and_the_engine_reads_it_back() -> None:
    m, e = _manager()
    h = m.open()
    assert e.step([h], [5], [0])  # the first step computes the encoder once
    enc = _encoder_pages(m, h)
    assert len(enc) == 3
    for c in range(6, 30):  # decode: the window goes stale, the encoder never does
        assert e.step([h], [c], [c - 1])
        m.check_invariants()
        assert _encoder_pages(m, h) == enc
    assert e.verify() > 0
    assert m.resize(h, 29, 29)
    m.commit(h, 29)
    child = e.fork(h, 29)  # a fork shares the encoder pages, copies nothing of them
    assert child is not None and _encoder_pages(m, child) == enc
    assert m.tiers.allocators[GPU][0].references(np.array(enc)).tolist() == [2, 2, 2]
    m.suspend(child)
    assert m.offload(child) and m.resume(child)  # the shared pages come back as a copy of their own
    e.verify()
    m.check_invariants()
    m.close(h)
    m.close(child)
    m.check_invariants()
    assert m.tiers.allocators[GPU][0].num_free == m.tiers.allocators[GPU][0].num_slots


def _run(m: KVCacheManager, e: FakeEngine, prompt: np.ndarray, scope: ReuseScope) -> tuple[int, int]:
    opened = e.open_with_prefix(prompt, scope)
    assert opened is not None
    h, reused = opened
    assert e.step([h], [prompt.size], [reused])
    e.publish(h, prompt, prompt.size, scope)
    return h, reused


def test_prefix_reuse_is_keyed_by_the_encoder_input() -> None:
    m, e = _manager()
    prompt = np.arange(21, dtype=np.int32)
    audio_1, audio_2 = ReuseScope(inputs=b"audio-1"), ReuseScope(inputs=b"audio-2")
    a, reused = _run(m, e, prompt, audio_1)
    assert reused == 0
    b, reused = _run(m, e, prompt, audio_1)  # same prompt, same audio: decoder blocks and encoder reused
    assert reused == 20
    assert _encoder_pages(m, b) == _encoder_pages(m, a)
    c, reused = _run(m, e, prompt, audio_2)  # same prompt, other audio: nothing (its KV differs)
    assert reused == 0 and not set(_encoder_pages(m, c)) & set(_encoder_pages(m, a))
    m.check_invariants()
    e.verify()
    assert m.prefix is not None
    assert m.prefix.probe(prompt, audio_1) == 20 and m.prefix.probe(prompt, ReuseScope()) == 0
    for h in (a, b, c):
        m.close(h)
    # drop one encoder page from the cache: a match needs every one, so none is left
    g = next(lg.id for lg in m.grouped.layer_groups if lg.life_cycle == ENC)
    enc_keys = ENC.reuse_keys([], audio_1.root(), TPB)
    rows = m.prefix.index.rows_of(enc_keys[1:2], g)
    assert rows.size == 1
    slots = m.prefix.index.row_locations(rows)[2]
    m.prefix._drop(GPU, 0, rows, slots)
    assert m.prefix.probe(prompt, audio_1) == 0
    m.check_invariants()
    e.verify()


def test_scheduler_runs_an_encoder_decoder_layout() -> None:
    """Admission counts the encoder blocks through the same demand function: 4 requests with
    prompts sharing 8 tokens, the prefix cache on, a pool too small for all of them at once."""
    m, _ = _manager(gpu_slots=40, host_slots=0)
    s = Scheduler(m, SchedulerConfig(max_batch_size=2, prefill_chunk_tokens=8))
    shared = np.arange(100, 108)
    reqs = [s.submit(SeqRequest(i, 9 + i, 12, tokens=np.concatenate([shared, np.arange(9 + i + 12) + 1000 * i])))
            for i in range(4)]
    now = 0.0
    while s.num_waiting or m.rows.n:
        plan_ = s.schedule()
        assert plan_.advanced
        s.complete(plan_, now)
        m.check_invariants()
        now += 1
    assert [r.status for r in reqs] == [Status.FINISHED] * 4 and s.preemptions == 0


def test_close_many_frees_encoder_blocks_past_the_capacity_blocks() -> None:
    """Capacity 5 spans 2 token blocks, but the encoder holds 3: closing must free all 3."""
    m, e = _manager()
    hs = [m.open(), m.open()]
    assert e.step(hs, [5, 5], [0, 0])
    m.close_many(hs)
    m.check_invariants()
    assert [a.num_in_use for a in m.tiers.allocators[GPU]] == [0] * len(m.grouped.pool_groups)
