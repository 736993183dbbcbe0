"""Planner: exact numbers, the issue-15401 shape, and guarantees as properties."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv.core.errors import CapacityError, ConfigError
from hybridkv.core.types import GIB
from hybridkv.layouts.catalog import catalog_layout
from hybridkv.layouts.grouping import group_layers
from hybridkv.layouts.spec import ModelLayout, attention_layer, ssm_layer
from hybridkv.lifecycles import Chunked, Full, Sliding
from hybridkv.planning.demand import Batch, batch_demand, demand
from hybridkv.planning.planner import PlanSpec, PoolPlan, compute_floors, plan, split_slots
from hybridkv.planning.report import ideal_concurrency, max_concurrency, max_seq_len_at


def check_plan(p: PoolPlan) -> None:
    assert p.gpu_bytes_used <= p.spec.gpu_bytes
    for pg in p.pool_groups:
        assert pg.slots >= pg.min_slots
        assert pg.bytes == pg.slots * pg.slot_bytes


def fits(p: PoolPlan, caps: np.ndarray, hists: np.ndarray, prefix: int = 0) -> bool:
    return all(n <= s for n, s in zip(demand(p.grouped, caps, hists, prefix), p.slots, strict=True))


def test_gemma_3_27b_at_40gib_exact() -> None:
    p = plan(PlanSpec(catalog_layout("gemma-3-27b"), 40 * GIB, 32768, pools="per-lifecycle"))
    check_plan(p)
    sw_slot, full_slot = 52 * 2 * 16 * 128 * 2 * 16, 10 * 2 * 16 * 128 * 2 * 16
    assert [pg.slot_bytes for pg in p.pool_groups] == [sw_slot, full_slot]
    # window 1024, tpb 16: worst decode straddles 1023/16 -> 64 + 1 = 65 blocks, x 32 requests
    assert [pg.min_slots for pg in p.pool_groups] == [32 * 65, 32768 // 16]
    assert p.pool_groups[0].slots == 2080  # the typical step wants less than the floor
    assert p.pool_groups[1].slots == (40 * GIB - 2080 * sw_slot) // full_slot == 21952
    assert max_concurrency(p, 32768).requests == pytest.approx(21952 / 2048)
    assert ideal_concurrency(p.spec.layout, 40 * GIB, 32768) == pytest.approx(
        40 * GIB / (52 * 8192 * 1024 + 10 * 8192 * 32768))


def test_issue_15401_shape_floors_and_every_position_mod_256() -> None:
    layers = (tuple(attention_layer(1, 288, 2, Sliding(128)) for _ in range(3))
              + tuple(attention_layer(1, 256, 2, Full()) for _ in range(3))
              + tuple(attention_layer(1, 64, 2, Sliding(8)) for _ in range(3)))
    spec = PlanSpec(ModelLayout("dsv4-like", layers), gpu_bytes=20 * GIB, max_seq_len=137984,
                    tokens_per_block=256, max_batch_size=64)
    p = plan(spec)
    check_plan(p)
    floors = [pg.min_slots for pg in p.pool_groups]
    assert floors == [128, 539, 128]  # a single-request planner gives [1, 539, 1]
    # the production planner's floors would have starved: 2 decodes straddling need 4 slots
    one_request = demand(p.grouped, [137984], [137983])
    assert one_request == (1, 539, 1)
    rng = np.random.default_rng(0)
    for r in range(256):  # 64 decodes at every position mod 256 (in the second block)
        h = np.full(64, 256 + r)
        assert fits(p, h + 1, h)
        jitter = 256 * rng.integers(1, 3, 64) + rng.integers(0, 256, 64)  # mixed positions
        assert fits(p, jitter + 1, jitter)


def test_quota_below_floors_raises_with_numbers() -> None:
    spec = PlanSpec(catalog_layout("gemma-3-27b"), 4 * GIB, 32768, pools="per-lifecycle")
    with pytest.raises(CapacityError) as e:
        plan(spec)
    need = 2080 * 52 * 8192 * 16 + 2048 * 10 * 8192 * 16
    assert f"they need {need} B" in str(e.value) and "Raise --gpu-mem" in str(e.value)


def test_constraints_raise_floors_and_name_themselves() -> None:
    c = Batch.uniform("long-decodes", 4, 32768)
    p = plan(PlanSpec(catalog_layout("gemma-3-27b"), 40 * GIB, 32768, constraints=(c,), pools="per-lifecycle"))
    check_plan(p)
    assert p.pool_groups[1].min_slots == 4 * 2048
    assert p.pool_groups[1].floor_source == "constraint 'long-decodes'"
    assert all(n <= s for n, s in zip(batch_demand(p.grouped, c), p.slots, strict=True))


def test_spec_validation_names_the_setting() -> None:
    layout = catalog_layout("llama-3.1-8b")
    with pytest.raises(ConfigError, match="max_batch_size"):
        PlanSpec(layout, GIB, 1024, max_batch_size=0)
    with pytest.raises(ConfigError, match="--max-seq-len"):
        PlanSpec(layout, GIB, 1024, constraints=(Batch.uniform("c", 1, 2048),))


def test_split_slots_water_fills_and_respects_granularity() -> None:
    # group 0 already above its share at its floor; group 1 takes the rest, rounded to 8
    slots = split_slots((10, 1), (100, 10), (1, 10), 10 * 100 + 1000, granularity=8)
    assert slots == (100, 1000)
    slots = split_slots((3, 5), (0, 0), (1, 1), 80, granularity=4)
    assert slots == (12, 8) and 3 * 12 + 5 * 8 <= 80


def greedy_leftover(slot_bytes: tuple[int, ...], slots: tuple[int, ...], typical: tuple[int, ...], quota: int,
                    granularity: int) -> tuple[int, ...]:
    """The leftover rule one granule at a time: to the group furthest below its share that can pay."""
    out, left = list(slots), quota - sum(b * s for b, s in zip(slot_bytes, slots, strict=True))
    while fits := [g for g, d in enumerate(typical) if d and slot_bytes[g] * granularity <= left]:
        g = min(fits, key=lambda i: (Fraction(out[i], typical[i]), i))
        out[g] += granularity
        left -= slot_bytes[g] * granularity
    return tuple(out)


@settings(max_examples=300, deadline=None)
@given(groups=st.lists(st.tuples(st.integers(1, 50), st.integers(0, 20), st.sampled_from([0, 1, 2, 3, 7, 100])),
                       min_size=1, max_size=4),
       extra=st.integers(0, 3000), granularity=st.integers(1, 4))
def test_split_spreads_leftover_like_one_granule_at_a_time(groups: list[tuple[int, int, int]], extra: int,
                                                           granularity: int) -> None:
    slot_bytes, floors, typical = (tuple(x) for x in zip(*groups, strict=True))
    quota = sum(b * f for b, f in zip(slot_bytes, floors, strict=True)) + extra
    rounded = split_slots(slot_bytes, floors, typical, quota, granularity, spread_leftover=False)
    assert split_slots(slot_bytes, floors, typical, quota, granularity) == \
        greedy_leftover(slot_bytes, rounded, typical, quota, granularity)


def test_split_with_slot_sizes_2_to_the_40_apart_ends() -> None:
    """The leftover a 2^40-byte slot cannot use goes to the 1-byte group in one pass, not 2^40."""
    slots = split_slots((1 << 40, 1, 1), (0, 0, 0), (2, 1, 1), 1 << 60)
    assert slots == (1048575, 549755813888, 549755813888)
    assert (1 << 40) * slots[0] + slots[1] + slots[2] == 1 << 60


def test_max_seq_len_at_batch() -> None:
    p = plan(PlanSpec(catalog_layout("llama-3.1-8b"), 40 * GIB, 32768))
    # 40 GiB / (32 layers x 4096 B x 16 tokens) = 20480 slots; 8 requests -> 2560 blocks each
    assert max_seq_len_at(p, 8) == 2560 * 16
    windows_only = plan(PlanSpec(catalog_layout("mistral-7b-v0.1"), 40 * GIB, 32768))
    assert max_seq_len_at(windows_only, 8) is None  # windows never grow past 257 blocks


LAYERS = st.sampled_from([
    attention_layer(1, 64, 2, Full()), attention_layer(2, 64, 2, Full()),
    attention_layer(1, 64, 2, Sliding(4)), attention_layer(1, 64, 2, Sliding(100, 4)),
    attention_layer(1, 32, 2, Sliding(16)), attention_layer(1, 64, 2, Chunked(48)),
    ssm_layer(100, 1000, 2, 4),
])


@settings(max_examples=150, deadline=None)
@given(layers=st.lists(LAYERS, min_size=1, max_size=5), tpb=st.sampled_from([1, 4, 16]),
       batch=st.integers(1, 12), max_len=st.integers(1, 300), extra=st.floats(0, 3),
       cons=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 300), st.integers(0, 300)), max_size=3),
       seed=st.integers(0, 2**31))
def test_guarantees_hold_for_random_layouts(layers: list, tpb: int, batch: int, max_len: int,
                                            extra: float, cons: list, seed: int) -> None:
    layout = ModelLayout("rand", tuple(layers))
    constraints = tuple(Batch.uniform(f"c{i}", n, min(c, max_len), min(h, c, max_len))
                        for i, (n, c, h) in enumerate(cons))
    probe = PlanSpec(layout, 1, max_len, tpb, batch, constraints=constraints, pools="per-lifecycle")
    grouped = group_layers(layout, tpb)
    need = sum(f.min_slots * pg.slot_bytes for f, pg in zip(compute_floors(probe, grouped),
                                                            grouped.pool_groups, strict=True))
    spec = PlanSpec(layout, int(need * (1 + extra)) + 1, max_len, tpb, batch, constraints=constraints,
                    pools="per-lifecycle")
    p = plan(spec)
    check_plan(p)
    h = np.arange(max_len)
    for single in h:  # one request of max_len alone, every position
        assert fits(p, np.array([single + 1]), np.array([single]))
    for c in constraints:
        assert fits(p, np.array(c.capacity), np.array(c.history))
    rng = np.random.default_rng(seed)
    for _ in range(20):  # max_batch_size concurrent decodes at random positions
        pos = rng.integers(0, max_len, batch)
        for pg, slots in zip(p.grouped.pool_groups, p.slots, strict=True):
            lcs = p.grouped.life_cycles(pg.id)
            # bounded groups: any position; groups with full attention: short requests
            lim = max_len if all(lc.is_bounded_below(max_len) for lc in lcs) else min(tpb, max_len)
            short = pos % lim
            assert demand(p.grouped, short + 1, short)[pg.id] <= slots
    if need > 1:  # one byte less than the floors: refused, never silently raised
        with pytest.raises(CapacityError):
            plan(PlanSpec(layout, need - 1, max_len, tpb, batch, constraints=constraints, pools="per-lifecycle"))


def test_ideal_bytes_count_each_kind_of_layer_once_and_match_the_per_layer_sum() -> None:
    """``ideal_bytes_per_request`` sums over kinds of layers (life cycle, bytes per token,
    state bytes) times their count: the same number as the sum over every layer."""
    from hybridkv.planning.report import ideal_bytes_per_request, layer_kinds

    layers = ([attention_layer(2, 128, 2, Sliding(512))] * 5 + [attention_layer(2, 128, 2, Full())]) * 40 \
        + [ssm_layer(96, 1024, 2, 4)] * 17 + [attention_layer(4, 64, 2, Chunked(256))] * 3
    layout = ModelLayout("mixed", tuple(layers))
    assert sorted(n for *_, n in layer_kinds(layout)) == [3, 17, 40, 200]
    for length in (1, 255, 256, 511, 512, 513, 4096, 1 << 20):
        brute = sum(layer.kv_bytes_per_token * int(layer.life_cycle.ideal_live_tokens(length)) + layer.state_bytes
                    for layer in layout.layers)
        assert ideal_bytes_per_request(layout, length) == brute
