"""Shared pools: layer groups cut to one page size draw from one arena (layouts/arena.py), the
planner reserves only what liveness needs, and pages move between life cycles step by step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybridkv.cli.main import main
from hybridkv.core.errors import CapacityError, ConfigError
from hybridkv.core.types import GPU
from hybridkv.engine.fake import FakeEngine
from hybridkv.layouts.arena import choose_arena
from hybridkv.layouts.grouping import group_layers
from hybridkv.layouts.models import load_model
from hybridkv.layouts.spec import ModelLayout, attention_layer, ssm_layer
from hybridkv.lifecycles import Full, Sliding
from hybridkv.manager.manager import KVCacheManager, ManagerConfig
from hybridkv.planning.planner import PlanSpec, plan
from hybridkv.planning.report import ideal_max_seq_len_at, max_seq_len_at
from hybridkv.storage.pages import page_specs

GIB = 1 << 30


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_gemma_3_27b_two_layers_per_page_one_arena() -> None:
    """52 window + 10 full layers of equal pages: 2 layers per page divides both, no padding,
    31 tables; a page is 2 layers x 16 tokens x 8 KiB."""
    g = group_layers(load_model("gemma-3-27b"), 16, "shared")
    assert (g.page_bytes, len(g.layer_groups), len(g.pool_groups), g.padding_bytes) == (262144, 31, 1, 0)
    assert [len(lg.layer_ids) for lg in g.layer_groups] == [2] * 31
    assert sum(isinstance(lg.life_cycle, Full) for lg in g.layer_groups) == 5
    assert sorted(i for lg in g.layer_groups for i in lg.layer_ids) == list(range(62))
    p = plan(PlanSpec(load_model("gemma-3-27b"), 40 * GIB, 32768, pools="shared"))
    (pg,) = p.pool_groups
    # floor: one 32k request alone = 5 full groups x 2048 blocks + 26 window groups x 65
    assert (pg.slots, pg.min_slots) == (163840, 5 * 2048 + 26 * 65)
    assert pg.floor_source == "1 request of max_seq_len 32768 alone"


def _layer(per_token_halves: int, lc: Full | Sliding) -> object:
    return attention_layer(per_token_halves, 4, 2, lc)  # 2 x heads x 4 x 2 B = 16 x heads B per token


def test_choice_by_the_stated_cost() -> None:
    """Full layers of 64 B pages, window layers of 128 B (tpb 4). 128 B: 4 tables; 256 B: 2
    tables, no padding (wins); 192 B or 384 B would pad the full layers by a third."""
    layout = ModelLayout("mixed", (attention_layer(1, 4, 2, Full()),) * 4 + (attention_layer(2, 4, 2, Sliding(8)),) * 2)
    c = choose_arena(layout, 4)
    assert (c.page_bytes, c.tables, c.padding_bytes, c.own_pools) == (256, 2, 0, ())
    g = group_layers(layout, 4, "shared")
    assert [lg.layer_ids for lg in g.layer_groups] == [(0, 1, 2, 3), (4, 5)]
    assert len(g.pool_groups) == 1 and g.pool_groups[0].slot_bytes == 256


def test_a_life_cycle_no_page_suits_keeps_its_own_pool() -> None:
    """3 full layers of 64 B and 1 window layer of 128 B: 192 B pages hold the full layers
    exactly but pad the window page by a third; 128 B or 256 B pages pad the full layers by a
    quarter. Most bytes join at 192 B; the window keeps its own pool and the grouping says why."""
    layout = ModelLayout("pad", (attention_layer(1, 4, 2, Full()),) * 3 + (attention_layer(2, 4, 2, Sliding(8)),))
    g = group_layers(layout, 4, "shared")
    assert g.page_bytes == 192 and [lg.slot_bytes for lg in g.layer_groups] == [192, 128]
    assert len(g.pool_groups) == 2
    assert g.own_pools == ("window(8) keeps its own pool: 192 B pages would waste 33% of its memory (>= 5%)",)


def test_padding_is_reported_and_the_page_layout_leaves_it_unused() -> None:
    """5 full layers of 64 B pages, 9 window layers of 64 B and one of 48 B (tpb 4). No page
    size packs the window layers without padding; 320 B pages (5 layers) take 3 tables and pad
    16 B of the window's 640 (2.5% < 5%: it joins); 64 B pages would need 15 tables for the same
    padding; 128 B pages would pad the full layers by a sixth."""
    full = attention_layer(1, 4, 2, Full())
    win, small = attention_layer(1, 4, 2, Sliding(8)), attention_layer(1, 3, 2, Sliding(8))
    layout = ModelLayout("pad2", (full,) * 5 + (win,) * 9 + (small,))
    g = group_layers(layout, 4, "shared")
    # 320 B pages: full 1 page exact; window 9 x 64 + 48 = 624 B in 2 pages of 320 -> 16 B padding (2.5%)
    assert g.page_bytes == 320
    assert [(lg.slot_bytes, lg.used_bytes) for lg in g.layer_groups] == [(320, 320), (320, 320), (320, 304)]
    assert g.padding_bytes == 16 and g.own_pools == ()


def test_shared_pools_drop_the_concurrent_decode_reservation() -> None:
    """At max_batch_size 256 the per-lifecycle floors need more than 40 GiB; the arena plans,
    reserving only one 32k request alone, and says how long 256 requests can run together."""
    layout = load_model("gemma-3-27b")
    with pytest.raises(CapacityError, match="256 concurrent decodes"):
        plan(PlanSpec(layout, 40 * GIB, 32768, max_batch_size=256, pools="per-lifecycle"))
    p = plan(PlanSpec(layout, 40 * GIB, 32768, max_batch_size=256, pools="shared"))
    longest = max_seq_len_at(p, 256)
    ideal = ideal_max_seq_len_at(layout, 40 * GIB, 256)
    assert longest is not None and ideal is not None and 0.95 * ideal <= longest <= ideal
    with pytest.raises(ConfigError, match="pools"):
        PlanSpec(layout, 40 * GIB, 32768, pools="arena")


def test_pages_move_between_life_cycles_step_by_step() -> None:
    """One arena for a full and a window group: the window's stale pages go back to the one
    allocator and the full group's next blocks take them (LIFO free stack)."""
    layout = ModelLayout("t", (attention_layer(1, 8, 2, Full()), attention_layer(1, 8, 2, Sliding(4))))
    p = plan(PlanSpec(layout, 64 * 4 * 32, 64, tokens_per_block=4, max_batch_size=2, pools="shared"))
    assert len(p.pool_groups) == 1 and len(p.grouped.layer_groups) == 2
    m = KVCacheManager(p, ManagerConfig(max_active_requests=2))
    e = FakeEngine(m)
    h = m.open()
    assert e.step([h], [12], [0])  # 3 blocks in each group
    row = int(m.row_of([h])[0])
    window_slots = m.rows.pages(row, 1)[1].tolist()
    assert e.step([h], [13], [12])  # window (4) at history 12 keeps block 2: blocks 0, 1 go stale
    full_new = m.rows.pages(row, 0)[1].tolist()[3]
    assert full_new in window_slots[:2]  # a window page freed this step is the full group's new block
    m.check_invariants()
    e.verify()
    assert m.tiers.allocators[GPU][0].num_in_use == 4 + 2


def test_cli_pools_flag_and_json_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "plan", "gemma-3-27b", "--gpu-mem", "40GiB", "--pools", "shared", "--json")
    j = json.loads(out)
    assert code == 0 and (j["pools_mode"], j["page_bytes"], j["padding_bytes"], j["tables_per_step"]) == \
        ("shared", 262144, 0, 31)
    assert j["concurrency_ratio_to_ideal"] == pytest.approx(0.998, abs=5e-4)
    code, out, _ = run_cli(capsys, "plan", "gemma-3-27b", "--gpu-mem", "40GiB", "--pools", "per-lifecycle", "--json")
    j = json.loads(out)
    assert (j["pools_mode"], j["page_bytes"], j["padding_bytes"], j["tables_per_step"]) == ("per-lifecycle", None, 0, 2)
    code, out, _ = run_cli(capsys, "plan", "gemma-3-27b", "--gpu-mem", "40GiB", "--pools", "shared")
    assert code == 0 and "shared arena: page 262144 B, 31 layer groups" in out and "26xwindow(1024)+5xfull" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "gemma-3-27b", "--gpu-mem", "40GiB", "--pools", "arena"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--pools" in err and len(err.strip().splitlines()) == 1


def test_qwen3_next_states_are_sliced_into_arena_pages() -> None:
    """The 36 gated-delta-net states (1,097,728 B each, 37.7 MiB in all) are cut into 101
    slices of the 393,216 B page (12 full layers x 32 KiB), the last one half used: one arena,
    no own pools, whose only reservation is one 32k request alone (2048 full blocks + one page
    per slice). Per-lifecycle mode keeps a state pool with the concurrent-decode reservation."""
    g = group_layers(load_model("qwen3-next-80b-a3b"), 16, "shared")
    assert (g.page_bytes, len(g.pool_groups), g.own_pools, len(g.layer_groups)) == (393_216, 1, (), 102)
    slices = [lg for lg in g.layer_groups if lg.state_slice is not None]
    assert [lg.state_slice for lg in slices] == [(k, 101) for k in range(101)]
    assert all(lg.layer_ids == tuple(i for i in range(48) if i % 4 != 3) for lg in slices)
    assert g.padding_bytes == 101 * 393_216 - 36 * 1_097_728 == 196_608
    p = plan(PlanSpec(load_model("qwen3-next-80b-a3b"), 40 * GIB, 32768, pools="shared"))
    ((pg),) = p.pool_groups
    assert (pg.min_slots, pg.floor_source) == (2048 + 101, "1 request of max_seq_len 32768 alone")
    assert 40 * GIB - pg.slot_bytes < p.gpu_bytes_used <= 40 * GIB
    p = plan(PlanSpec(load_model("qwen3-next-80b-a3b"), 40 * GIB, 32768, pools="per-lifecycle"))
    assert [(pg.min_slots, pg.floor_source) for pg in p.pool_groups] == [
        (32, "32 concurrent decodes (max_batch_size) at worst-case positions"),
        (2048, "1 request of max_seq_len 32768 alone")]


def _sliced_layout() -> ModelLayout:
    """Two state layers of 8 + 40 = 48 B and a full layer of 16 B per token: at tpb 1 the
    96 B of states are 6 slices of the 16 B page, cutting both layers' buffers mid-way."""
    return ModelLayout("sliced", (ssm_layer(8, 40, 1, 1), attention_layer(1, 8, 1, Full()),
                                  ssm_layer(8, 40, 1, 1)))


def test_state_slices_address_every_state_byte_once() -> None:
    g = group_layers(_sliced_layout(), 1, "shared")
    assert g.page_bytes == 16 and [lg.state_slice for lg in g.layer_groups] == [
        (0, 6), (1, 6), (2, 6), (3, 6), (4, 6), (5, 6), None]
    specs = [page_specs(g, lg.id) for lg in g.layer_groups[:6]]
    # (layer, buffer, offset in the slot, bytes, first byte of the state part)
    assert [[(s.layer_id, s.buffer, s.offset, s.page_bytes, s.start) for s in sl] for sl in specs] == [
        [(0, "conv", 0, 8, 0), (0, "ssm", 8, 8, 0)],
        [(0, "ssm", 0, 16, 8)],
        [(0, "ssm", 0, 16, 24)],
        [(2, "conv", 0, 8, 0), (2, "ssm", 8, 8, 0)],
        [(2, "ssm", 0, 16, 8)],
        [(2, "ssm", 0, 16, 24)],
    ]
    covered: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for sl in specs:
        for sp in sl:
            assert sp.stride == 16 and sp.offset + sp.page_bytes <= 16
            covered.setdefault((sp.layer_id, sp.buffer), []).append((sp.start, sp.start + sp.page_bytes))
    assert covered == {(0, "conv"): [(0, 8)], (0, "ssm"): [(0, 8), (8, 24), (24, 40)],
                       (2, "conv"): [(0, 8)], (2, "ssm"): [(0, 8), (8, 24), (24, 40)]}


def test_sliced_states_through_fork_prefix_hit_offload_and_resume() -> None:
    """A state is one page in each of 6 slice groups: a step writes all of them, a fork copies
    all of them, a prefix hit opens from a snapshot in all of them, offload and resume move
    them; the fake engine reads every page back as its writer wrote it."""
    layout = _sliced_layout()
    p = plan(PlanSpec(layout, 16 * 200, 32, tokens_per_block=1, max_batch_size=2, host_bytes=16 * 200,
                      pools="shared"))
    assert len(p.pool_groups) == 1 and len(p.grouped.layer_groups) == 7
    m = KVCacheManager(p, ManagerConfig(max_active_requests=6))
    m.enable_prefix_cache()
    e = FakeEngine(m)
    prompt = np.arange(100, 112, dtype=np.int32)
    a = m.open()
    assert a is not None and e.step([a], [12], [0])
    e.publish(a, prompt, 12)
    assert m.resize(a, 12, 12)
    m.commit(a, 12)
    used = m.tiers.allocators[GPU][0].num_in_use
    child = e.fork(a, 12)
    assert child is not None
    assert m.tiers.allocators[GPU][0].num_in_use == used + 6  # a copy of the state; full pages shared
    m.check_invariants()
    e.verify()
    opened = e.open_with_prefix(np.arange(100, 113, dtype=np.int32))  # the prompt and one more token
    assert opened is not None and opened[1] == 12  # from the state snapshot at 12
    b = opened[0]
    assert e.step([b, child], [13, 13], [12, 12])
    m.suspend(b)
    assert m.offload(b, "host")
    m.check_invariants()
    assert m.resume(b)
    assert e.step([b], [14], [13])
    m.check_invariants()
    e.verify()
    for h in (a, b, child):
        m.close(h)
    m.check_invariants()


def test_shared_pools_refuse_only_when_one_request_alone_cannot_fit() -> None:
    """mistral (all window layers: a bounded pool) at B = 256 would need 128.5 GiB for the
    concurrent-decode reservation: per-lifecycle refuses, shared drops the reservation."""
    layout = load_model("mistral-7b-v0.1")
    with pytest.raises(CapacityError, match="256 concurrent decodes"):
        plan(PlanSpec(layout, 40 * GIB, 32768, max_batch_size=256, pools="per-lifecycle"))
    p = plan(PlanSpec(layout, 40 * GIB, 32768, max_batch_size=256, pools="shared"))
    assert [pg.floor_source for pg in p.pool_groups] == ["1 request of max_seq_len 32768 alone"]
    with pytest.raises(CapacityError, match="1 request of max_seq_len 32768 alone"):
        plan(PlanSpec(layout, GIB // 4, 32768, max_batch_size=256, pools="shared"))  # one needs 514 MiB
