"""Batched seeded sampling (``runtime/sampling.py``): the hash against a pure-Python
reference, the draws against ``softmax(logits / T)`` over 40,000 seeded rows (chi-square),
and a request's draws independent of the batch it shares a step with (through the engine too)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from hybridkv.runtime import sampling  # noqa: E402


def lowbias32(x: int) -> int:
    """The reference mixer in Python integers."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_the_hash_is_lowbias32_on_every_32_bit_input_tried() -> None:
    rng = np.random.default_rng(0)
    xs = [0, 1, 2**31, 2**32 - 1, *rng.integers(0, 2**32, 2000).tolist()]
    got = sampling.mix32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [lowbias32(x) for x in xs]
    assert len(set(got)) == len(set(xs))  # a bijection on 32 bits: no two inputs collide


def test_uniforms_lie_in_the_open_interval_and_differ_per_position_and_seed() -> None:
    seeds = torch.arange(20_000) * 7919
    u = sampling.uniforms(seeds, torch.zeros_like(seeds))
    assert u.dtype == torch.float64 and float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.003
    assert torch.unique(u).numel() == u.numel()
    nxt = sampling.uniforms(seeds, torch.ones_like(seeds))  # the next position of each seed
    assert abs(float(torch.corrcoef(torch.stack([u, nxt]))[0, 1])) < 0.03
    high = sampling.uniforms(torch.tensor([5, 5 + 2**32, 5 + 2**62]), torch.tensor([0, 0, 0]))
    assert torch.unique(high).numel() == 3  # seeds that differ only above bit 32 still differ


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_the_softmax_of_the_tempered_logits(temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.25])
    n = 40_000
    tokens = sampling.sample(logits.expand(n, -1), torch.full((n,), temperature), torch.arange(n) * 7919,
                             torch.arange(n) % 97)
    counts = torch.bincount(tokens, minlength=8).double()
    p = torch.softmax(logits.double() / temperature, dim=0)
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 24.3  # the 0.999 quantile of chi-square with 7 degrees of freedom
    assert float((counts / n - p).abs().max()) < 4 * math.sqrt(0.25 / n)


def test_a_rows_draw_depends_on_its_seed_position_and_logits_only() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=g)
    temps, seeds, pos = torch.tensor([0.7, 1.0, 1.3, 0.9, 1.1, 0.8]), torch.arange(6) + 100, torch.arange(6) * 3
    whole = sampling.sample(logits, temps, seeds, pos)
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    assert torch.equal(sampling.sample(logits[order], temps[order], seeds[order], pos[order]), whole[order])
    for r in range(6):
        alone = sampling.sample(logits[r:r + 1], temps[r:r + 1], seeds[r:r + 1], pos[r:r + 1])
        assert int(alone) == int(whole[r])
    cold = sampling.sample(logits, torch.full((6,), 1e-4), seeds, pos)  # near zero: the argmax
    assert torch.equal(cold, logits.argmax(dim=-1))


def test_engine_draws_do_not_depend_on_the_batch() -> None:
    pytest.importorskip("transformers")
    from hybridkv.runtime.engine import Engine, EngineConfig
    from hybridkv.runtime.model import build_model

    def engine() -> Engine:
        return Engine(build_model("gemma3_text", seed=1), EngineConfig(gpu_bytes=1 << 20, host_bytes=0,
                                                                       max_seq_len=64, tokens_per_block=4))

    alone = engine()
    a = alone.add_request([1, 2, 3], 6, temperature=0.9, seed=11)
    list(alone.stream())
    together = engine()
    together.add_request(list(range(20)), 9)  # greedy, longer, admitted first
    b = together.add_request([1, 2, 3], 6, temperature=0.9, seed=11)
    together.add_request([9, 9], 4, temperature=1.5, seed=2)
    list(together.stream())
    assert together.requests[b].outputs == alone.requests[a].outputs
    assert len(set(alone.requests[a].outputs)) > 1  # (a random model at 0.9 does not repeat one token)


def test_a_token_of_zero_probability_is_never_drawn() -> None:
    logits = torch.tensor([float("-inf"), 0.0, float("-inf"), 3.0, float("-inf")])
    n = 5_000
    tokens = sampling.sample(logits.expand(n, -1), torch.ones(n), torch.arange(n), torch.zeros(n, dtype=torch.long))
    counts = torch.bincount(tokens, minlength=5).tolist()
    assert counts[0] == counts[2] == counts[4] == 0 and counts[1] + counts[3] == n
    assert abs(counts[1] / n - 1 / (1 + math.e ** 3)) < 4 * math.sqrt(0.25 / n)
