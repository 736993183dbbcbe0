"""The demand function against brute-force block sets, shared prefixes included."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv.core.errors import ConfigError
from hybridkv.layouts.grouping import group_layers
from hybridkv.layouts.spec import ModelLayout, attention_layer, ssm_layer
from hybridkv.lifecycles import Chunked, Full, LifeCycle, Sliding, Ssm, live_blocks, stale_range
from hybridkv.planning.demand import Batch, batch_demand, concurrent_decode_demand, demand, layer_group_demand

LIFE_CYCLES = st.sampled_from([
    Full(), Sliding(1), Sliding(5), Sliding(16, 4),
    Sliding(40, 17), Chunked(8), Chunked(20), Ssm(),
])


def brute_blocks(lc: LifeCycle, c: int, h: int, tpb: int) -> set[int]:
    """Live block ordinals: all blocks of [0, c) minus the stale range."""
    stale = stale_range(lc, h, tpb)
    return {b for b in range(-(-c // tpb)) if not stale.start <= b < stale.stop}


@settings(max_examples=300, deadline=None)
@given(lc=LIFE_CYCLES, tpb=st.sampled_from([1, 4, 16]), prefix=st.integers(0, 90),
       reqs=st.lists(st.tuples(st.integers(1, 120), st.integers(0, 120)), min_size=1, max_size=8))
def test_shared_prefix_is_counted_once(lc: LifeCycle, tpb: int, prefix: int,
                                       reqs: list[tuple[int, int]]) -> None:
    caps = np.array([max(c, h) for c, h in reqs])
    hists = np.array([min(c, h) for c, h in reqs])
    got = layer_group_demand(lc, tpb, caps, hists, prefix)
    if isinstance(lc, Ssm):
        assert got == int((caps > 0).sum())
        return
    shared = set(range(prefix // tpb))
    private, union = 0, set()
    for c, h in zip(caps.tolist(), hists.tolist(), strict=True):
        blocks = brute_blocks(lc, c, h, tpb)
        assert len(blocks) == int(live_blocks(lc, c, h, tpb))
        private += len(blocks - shared)
        union |= blocks & shared
    assert got == private + len(union)


def test_demand_sums_layer_groups_that_share_a_pool_group() -> None:
    # gpt-oss-like: sliding and full layers with equal slot bytes share one pool group
    sw, full = attention_layer(8, 64, 2, Sliding(128)), attention_layer(8, 64, 2, Full())
    grouped = group_layers(ModelLayout("t", (sw, full, sw, full)), 16)
    assert len(grouped.pool_groups) == 1 and len(grouped.layer_groups) == 2
    # history 1000, capacity 1001: full 63 blocks; window keeps [873, 1001) -> blocks 54..62 = 9
    assert demand(grouped, [1001], [1000]) == (63 + 9,)


def test_pool_groups_split_by_slot_bytes_and_ssm_is_one_slot_per_request() -> None:
    layers = (attention_layer(2, 256, 2, Full()), ssm_layer(24576, 524288, 2, 2))
    grouped = group_layers(ModelLayout("t", layers * 2), 16)
    assert [pg.slot_bytes for pg in grouped.pool_groups] == [2 * 2 * 2 * 256 * 2 * 16, 2 * 1097728]
    assert demand(grouped, [33, 1, 100], [32, 0, 0]) == (3 + 1 + 7, 3)


def test_concurrent_decode_demand_counts_worst_straddle_for_windows_and_one_block_for_full() -> None:
    layers = (attention_layer(1, 64, 2, Sliding(128)), attention_layer(1, 128, 2, Full()))
    grouped = group_layers(ModelLayout("t", layers), 256)
    assert concurrent_decode_demand(grouped, 64, 137984) == (128, 64)
    # a window as long as the sequence never drops a token: treated like full
    assert concurrent_decode_demand(grouped, 64, 100) == (64, 64)


def test_batch_validation() -> None:
    for bad in [lambda: Batch("b", (4,), (5,)), lambda: Batch("b", (0,), (0,)),
                lambda: Batch("b", (), ()), lambda: Batch.uniform("b", 0, 10),
                lambda: Batch("b", (4, 4), (3,))]:
        try:
            bad()
        except ConfigError as e:
            assert "batch 'b'" in str(e)
        else:
            raise AssertionError("expected ConfigError")


def test_batch_demand_uses_the_prefix() -> None:
    grouped = group_layers(ModelLayout("t", (attention_layer(1, 64, 2, Full()),)), 16)
    # 4 requests of 100 tokens sharing 64: 4 shared blocks once + 4 x 3 own blocks
    assert batch_demand(grouped, Batch.uniform("b", 4, 100, 99, prefix=64)) == (4 + 12,)
