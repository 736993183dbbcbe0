"""Step page bookkeeping: releasing stale ranges through the dense mask path (the step after
long prefills) gives exactly what addressing every entry gives — same table, same slots, same
change log — for sparse, uniform and ragged ranges, in and out of row order."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv.layouts.grouping import group_layers
from hybridkv.layouts.spec import ModelLayout, attention_layer
from hybridkv.lifecycles import Sliding
from hybridkv.manager.paging import Span, _release_span
from hybridkv.manager.rows import NULL_SLOT, ActiveRows


def _rows_with_tables(n: int, width: int, seed: int) -> ActiveRows:
    grouped = group_layers(ModelLayout("t", (attention_layer(1, 8, 1, Sliding(4)),)), 1)
    state = ActiveRows(grouped, n, width)
    state.n = n
    state.tables[0][:n] = np.random.default_rng(seed).permutation(n * width).reshape(n, width)
    state.log = []
    return state


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 12), width=st.integers(1, 20), seed=st.integers(0, 2**16),
       uniform=st.booleans(), subset=st.booleans(), shuffled=st.booleans())
def test_dense_release_equals_entry_by_entry(n: int, width: int, seed: int, uniform: bool, subset: bool,
                                              shuffled: bool) -> None:
    rng = np.random.default_rng(seed)
    rows = np.arange(n, dtype=np.int64)
    if subset:
        rows = np.sort(rng.choice(n, size=rng.integers(1, n + 1), replace=False)).astype(np.int64)
    if shuffled:
        rows = rng.permutation(rows)
    if uniform:
        a = int(rng.integers(0, width))
        start, stop = np.full(rows.size, a), np.full(rows.size, int(rng.integers(a + 1, width + 1)))
    else:
        start = rng.integers(0, width, rows.size)
        stop = start + rng.integers(1, width - start + 1)
    span = Span(rows, start.astype(np.int64), stop.astype(np.int64))
    dense, sparse = _rows_with_tables(n, width, seed), _rows_with_tables(n, width, seed)
    got = _release_span(dense, dense.families[0], span)
    c = span.coords()
    want = sparse.tables[0][c.rows, c.cols].copy()
    sparse.tables[0][c.rows, c.cols] = NULL_SLOT
    assert sorted(got.tolist()) == sorted(want.tolist())
    assert np.array_equal(dense.tables[0], sparse.tables[0])
    assert dense.log is not None
    logged = {(int(r), int(k)) for ch in dense.log for r, k in zip(ch.rows, ch.cols, strict=True)}
    assert logged == set(zip(c.rows.tolist(), c.cols.tolist(), strict=True))
    assert all((ch.slots == NULL_SLOT).all() for ch in dense.log)
