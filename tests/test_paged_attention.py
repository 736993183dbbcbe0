"""The torch paged attention against a float64 brute force written here token by token: random
pages in random slots, tables with holes where the mask never looks, GQA, windows with sink
tokens, chunks, softcap and learned sinks."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from hybridkv.core.errors import InvariantError, UsageError  # noqa: E402
from hybridkv.engine.paged_attention import paged_attention, write_kv  # noqa: E402

TOL = 2e-6  # float32 inputs and arithmetic against float64: max |diff| over outputs of magnitude <= ~3


def sees(p: int, j: int, window: int | None, sink_tokens: int, chunk: int | None) -> bool:
    if j > p:
        return False
    if window is not None and not (p - j < window or j < sink_tokens):
        return False
    return chunk is None or j // chunk == p // chunk


def brute_force(q, keys, values, q_row, q_pos, *, scale, window, sink_tokens, chunk, softcap, sinks):
    """float64, one query and one head at a time, over each row's logical key sequence."""
    t_count, hq, _ = q.shape
    out = np.zeros((t_count, hq, values[0].shape[2]))
    for t in range(t_count):
        r, p = int(q_row[t]), int(q_pos[t])
        group = hq // keys[r].shape[1]
        for h in range(hq):
            logits, vals = [], []
            for j in range(keys[r].shape[0]):
                if sees(p, j, window, sink_tokens, chunk):
                    s = float(np.dot(q[t, h], keys[r][j, h // group])) * scale
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    logits.append(s)
                    vals.append(values[r][j, h // group])
            extra = [float(sinks[h])] if sinks is not None else []
            top = max(logits + extra)
            weights = [math.exp(s - top) for s in logits]
            total = sum(weights) + sum(math.exp(s - top) for s in extra)
            out[t, h] = sum(w * v for w, v in zip(weights, vals, strict=True)) / total
    return out


CASES = [  # hq, hkv, d, dv, window, sink_tokens, chunk, softcap, learned sinks
    (4, 4, 8, 8, None, 0, None, None, False),
    (8, 2, 16, 16, None, 0, None, None, False),  # GQA
    (4, 2, 8, 8, 5, 0, None, None, False),  # window: holes before it
    (4, 1, 8, 12, 6, 3, None, None, False),  # window + sink tokens, Dv != D
    (4, 2, 8, 8, None, 0, 8, None, False),  # chunked
    (4, 2, 8, 8, None, 0, None, 5.0, False),  # softcap
    (4, 2, 8, 8, 7, 0, None, None, True),  # learned sinks + window (GPT-OSS)
    (6, 3, 8, 8, 4, 2, None, 3.0, True),  # everything at once
]


@pytest.mark.parametrize(("hq", "hkv", "d", "dv", "window", "sink_tokens", "chunk", "softcap", "learned"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force(hq, hkv, d, dv, window, sink_tokens, chunk, softcap, learned, seed) -> None:
    rng = np.random.default_rng(seed)
    tpb, num_slots, rows = 4, 40, 3
    kv_len = rng.integers(1, 26, rows)
    # each row's logical sequence, placed in random distinct slots; the rest of the pool is
    # large garbage that would dominate any logit it entered
    keys = [rng.standard_normal((n, hkv, d)) for n in kv_len]
    values = [rng.standard_normal((n, hkv, dv)) for n in kv_len]
    k_cache = rng.uniform(50, 100, (num_slots, tpb, hkv, d))
    v_cache = rng.uniform(50, 100, (num_slots, tpb, hkv, dv))
    width = int(max(-(-kv_len // tpb))) + 1
    table = np.full((rows, width), -1, np.int32)
    free = list(rng.permutation(num_slots))
    q_row, q_pos = [], []
    for r, n in enumerate(kv_len):
        step = int(rng.integers(1, n + 1))  # this step's queries: the last `step` positions
        q_row += [r] * step
        q_pos += list(range(n - step, n))
        needed = {j // tpb for p in range(n - step, n) for j in range(n) if sees(p, j, window, sink_tokens, chunk)}
        for b in sorted(needed):  # blocks no query sees stay holes
            s = free.pop()
            table[r, b] = s
            for j in range(b * tpb, min((b + 1) * tpb, n)):
                k_cache[s, j % tpb], v_cache[s, j % tpb] = keys[r][j], values[r][j]
    q = rng.standard_normal((len(q_row), hq, d))
    sinks = rng.standard_normal(hq) if learned else None
    scale = d ** -0.5
    want = brute_force(q, keys, values, q_row, q_pos, scale=scale, window=window, sink_tokens=sink_tokens,
                       chunk=chunk, softcap=softcap, sinks=sinks)
    got = paged_attention(
        torch.tensor(q, dtype=torch.float32), torch.tensor(k_cache, dtype=torch.float32),
        torch.tensor(v_cache, dtype=torch.float32), torch.tensor(table), torch.tensor(q_row),
        torch.tensor(q_pos), torch.tensor(kv_len), scale=scale, window=window, sink_tokens=sink_tokens,
        chunk=chunk, softcap=softcap, sinks=None if sinks is None else torch.tensor(sinks, dtype=torch.float32))
    assert got.dtype == torch.float32 and got.shape == (len(q_row), hq, dv)
    assert np.abs(got.numpy() - want).max() <= TOL


def test_write_kv_then_read_back() -> None:
    """Keys written through a table land at (slot, offset) and attention over one key is its value."""
    torch.manual_seed(0)
    k_cache, v_cache = torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8)
    table = torch.tensor([[3, 5, -1], [0, -1, -1]], dtype=torch.int32)
    rows, positions = torch.tensor([0, 0, 1]), torch.tensor([4, 5, 2])
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    write_kv(k_cache, v_cache, table, rows, positions, k, v)
    assert torch.equal(k_cache[5, 0], k[0]) and torch.equal(k_cache[5, 1], k[1]) and torch.equal(v_cache[0, 2], v[2])
    assert int((k_cache != 0).any(dim=(2, 3)).sum()) == 3  # nothing else written
    out = paged_attention(torch.randn(1, 4, 8), k_cache, v_cache, table, torch.tensor([1]), torch.tensor([2]),
                          torch.tensor([6, 3]), scale=0.1, window=1)
    assert torch.equal(out[0, :2], v[2, 0].expand(2, 8)) and torch.equal(out[0, 2:], v[2, 1].expand(2, 8))


def test_a_hole_the_mask_reads_is_a_bug() -> None:
    cache = torch.zeros(4, 2, 1, 4)
    table = torch.tensor([[-1, 1]], dtype=torch.int32)
    with pytest.raises(InvariantError, match="no page for visible position 0"):
        paged_attention(torch.zeros(1, 1, 4), cache, cache, table, torch.tensor([0]), torch.tensor([3]),
                        torch.tensor([4]), scale=1.0)
    with pytest.raises(InvariantError, match="no page"):
        write_kv(cache, cache, table, torch.tensor([0]), torch.tensor([1]), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))


def test_heads_must_divide() -> None:
    with pytest.raises(UsageError, match="multiple of the cache's kv heads 2"):
        paged_attention(torch.zeros(1, 3, 4), torch.zeros(2, 2, 2, 4), torch.zeros(2, 2, 2, 4),
                        torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0]), torch.tensor([0]),
                        torch.tensor([1]), scale=1.0)
