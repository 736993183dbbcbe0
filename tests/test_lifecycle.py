"""Life cycles against brute force: an attention mask evaluated token by token."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_mask import visible
from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_TOKENS
from hybridkv.lifecycles import (
    Chunked,
    Encoder,
    Full,
    LifeCycle,
    Sliding,
    Ssm,
    live_blocks,
    stale_range,
    worst_decode_blocks,
)


def brute_needed(lc: LifeCycle, h: int, q: int) -> bool:
    """Is token q still needed once history is h: some future query sees it, or it is future."""
    if q >= h:
        return True
    horizon = h + (lc.window_tokens or 0) + (lc.chunk_tokens or 0) + 2
    return any(visible(lc, p, q) for p in range(h, horizon))


def brute_live(lc: LifeCycle, c: int, h: int, tpb: int) -> int:
    blocks = -(-c // tpb)
    return sum(any(brute_needed(lc, h, q) for q in range(b * tpb, (b + 1) * tpb)) for b in range(blocks))


def brute_stale(lc: LifeCycle, h: int, tpb: int) -> list[int]:
    """Blocks wholly before h none of whose tokens is needed."""
    return [b for b in range(h // tpb) if not any(brute_needed(lc, h, q) for q in range(b * tpb, (b + 1) * tpb))]


WINDOWS = [1, 3, 4, 5, 8, 16, 17, 33]
TPBS = [1, 4, 16]
SINKS = [0, 1, 4, 5, 20]
SLIDING = [Sliding(w, s) for w, s in itertools.product(WINDOWS, SINKS)]
CHUNKED = [Chunked(c) for c in (1, 3, 4, 16, 24)]
ALL = [*SLIDING, *CHUNKED, Full()]


@pytest.mark.parametrize("tpb", TPBS)
@pytest.mark.parametrize("lc", ALL, ids=lambda lc: lc.describe())
def test_live_blocks_match_brute_force(lc: LifeCycle, tpb: int) -> None:
    hs = np.arange(0, 70)
    for extra in (0, 1, 7):
        got = live_blocks(lc, hs + extra, hs, tpb)
        want = [brute_live(lc, int(h) + extra, int(h), tpb) for h in hs]
        assert got.tolist() == want, (lc, tpb, extra)


@pytest.mark.parametrize("tpb", TPBS)
@pytest.mark.parametrize("lc", ALL, ids=lambda lc: lc.describe())
def test_stale_range_matches_brute_force(lc: LifeCycle, tpb: int) -> None:
    for h in range(0, 70):
        r = stale_range(lc, h, tpb)
        assert list(range(r.start, r.stop)) == brute_stale(lc, h, tpb), (lc, tpb, h)


@pytest.mark.parametrize("tpb", TPBS)
@pytest.mark.parametrize("lc", ALL, ids=lambda lc: lc.describe())
def test_worst_decode_matches_brute_force(lc: LifeCycle, tpb: int) -> None:
    for max_len in (1, 2, 5, 17, 40, 90):
        want = max(brute_live(lc, h + 1, h, tpb) for h in range(max_len))
        assert worst_decode_blocks((lc,), tpb, max_len) == want, (lc, tpb, max_len)


def test_worst_decode_of_a_mixed_pool_group_is_the_max_of_the_sum() -> None:
    lcs = (Full(), Sliding(5, 3), Chunked(6))
    for tpb, max_len in itertools.product((1, 4, 16), (1, 9, 50, 131)):
        want = max(sum(brute_live(lc, h + 1, h, tpb) for lc in lcs) for h in range(max_len))
        assert worst_decode_blocks(lcs, tpb, max_len) == want


LIFE_CYCLES = st.one_of(
    st.just(Full()), st.just(Ssm()),
    st.builds(Sliding, st.integers(1, 80), st.sampled_from([0, 0, 1, 3, 17])),
    st.builds(Chunked, st.integers(1, 80)), st.builds(Encoder, st.integers(1, 80)))


@settings(max_examples=300, deadline=None)
@given(lcs=st.sets(LIFE_CYCLES, min_size=1, max_size=3).map(tuple), tpb=st.integers(1, 20),
       max_len=st.integers(1, 400))
def test_worst_decode_matches_every_position(lcs: tuple[LifeCycle, ...], tpb: int, max_len: int) -> None:
    """worst_decode_blocks looks at a few candidate positions; the max over all of them agrees."""
    h = np.arange(max_len)
    want = max(sum(live_blocks(lc, h + 1, h, tpb) for lc in lcs).tolist())
    assert worst_decode_blocks.__wrapped__(lcs, tpb, max_len) == want


@pytest.mark.parametrize(("lcs", "tpb", "want"), [
    ((Sliding(10**12),), 16, -(-(10**12 - 1) // 16) + 1),  # the straddle of a huge window
    ((Chunked(3),), 1 << 20, 2),  # a chunk boundary in every block
    ((Chunked(2**39 + 1),), 16, 2**35 + 1),  # the first chunk, [0, 2^39], is the longest
    ((Chunked(8192), Full()), 16, 2**36 + 8192 // 16),
])
def test_worst_decode_up_to_max_tokens_is_immediate(lcs: tuple[LifeCycle, ...], tpb: int, want: int) -> None:
    """No dense scan: a window or chunk up to 2^40 tokens over 2^40 positions is a few evaluations."""
    assert worst_decode_blocks(lcs, tpb, MAX_TOKENS) == want


def test_worst_decode_refuses_chunk_patterns_too_long_to_check() -> None:
    with pytest.raises(ConfigError, match=r"chunk sizes \[3, 1073741825\] share one pool group"):
        worst_decode_blocks((Chunked(3), Chunked(2**30 + 1)), 1, MAX_TOKENS)


def test_straddle_formula_for_large_positions() -> None:
    # sink blocks + ceil((window - 1) / tpb) + 1, the worst case once the window left the sinks
    for w, s, tpb in [(128, 0, 256), (8, 0, 256), (1024, 0, 16), (1000, 4, 16), (257, 300, 256)]:
        want = -(-s // tpb) + -(-(w - 1) // tpb) + 1
        assert worst_decode_blocks((Sliding(w, s),), tpb, 10**6) == want


def test_window_release_keeps_at_most_worst_case_for_a_long_decode() -> None:
    lc, tpb = Sliding(128), 16
    h = np.arange(0, 100_000)
    live = live_blocks(lc, h + 1, h, tpb)
    assert int(live.max()) == worst_decode_blocks((lc,), tpb, 100_000) == 9


def test_ssm_holds_one_slot_per_request() -> None:
    lc = Ssm()
    assert live_blocks(lc, [0, 1, 5000], [0, 0, 4999], 16).tolist() == [0, 1, 1]
    assert len(stale_range(lc, 5000, 16)) == 0
    assert worst_decode_blocks((lc,), 16, 10**6) == 1


@pytest.mark.parametrize("bad", [
    lambda: Sliding(0), lambda: Sliding(4, -1), lambda: Chunked(0),
    lambda: Sliding(MAX_TOKENS + 1), lambda: Sliding(4, MAX_TOKENS + 1),
    lambda: Chunked(MAX_TOKENS + 1),
])
def test_invalid_life_cycles_raise(bad: object) -> None:
    with pytest.raises(ConfigError):
        bad()  # type: ignore[operator]
