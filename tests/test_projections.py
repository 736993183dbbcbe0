"""Sibling projections as one GEMM (``runtime/projections.py``): the same outputs, fewer GEMMs,
and a member's own projection whenever the fused one cannot serve it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
torch.set_num_threads(1)

from hybridkv.runtime import projections  # noqa: E402
from hybridkv.runtime.engine import Engine, EngineConfig  # noqa: E402
from hybridkv.runtime.model import build_model  # noqa: E402


class Attention(torch.nn.Module):
    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(8, n, bias=bias) for n in (12, 4, 4))
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64)

    def forward(self, x: Any) -> Any:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


class MLP(torch.nn.Module):
    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.gate_proj, self.up_proj = torch.nn.Linear(8, 6, bias=bias), torch.nn.Linear(8, 6, bias=bias)
        self.down_proj = torch.nn.Linear(6, 8, bias=False)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64)

    def forward(self, x: Any) -> Any:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Counting:
    """GEMMs: ``torch.nn.functional.linear`` and ``torch.matmul``, counting their calls."""

    def __init__(self) -> None:
        self.calls, self.linear, self.matmul = 0, torch.nn.functional.linear, torch.matmul

    def count(self, function: Any) -> Any:
        def counted(*args: Any) -> Any:
            self.calls += 1
            return function(*args)
        return counted


@pytest.fixture
def linear(monkeypatch: pytest.MonkeyPatch) -> Counting:
    counting = Counting()
    monkeypatch.setattr(torch.nn.functional, "linear", counting.count(counting.linear))
    monkeypatch.setattr(torch, "matmul", counting.count(counting.matmul))
    return counting


def brute(m: Attention, x: Any) -> Any:
    """The three projections, one by one, in float64."""
    return torch.cat([x @ p.weight.T + (0 if p.bias is None else p.bias) for p in (m.q_proj, m.k_proj, m.v_proj)],
                     dim=-1)


@pytest.mark.parametrize("bias", [False, True])
def test_a_group_runs_as_one_gemm_with_the_same_values(bias: bool, linear: Counting) -> None:
    m = Attention(bias)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(5, 8, dtype=torch.float64)
    assert projections.install(m) == 1
    # the same names and values; the weights are views of one stacked tensor, back to back
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    w = [p.weight for p in (m.q_proj, m.k_proj, m.v_proj)]
    assert len({t.untyped_storage().data_ptr() for t in w}) == 1
    assert [t.storage_offset() for t in w] == [0, 12 * 8, 16 * 8]
    linear.calls = 0
    out = m(x)
    assert linear.calls == 1 and torch.allclose(out, brute(m, x), rtol=0, atol=1e-12)
    # (the group holds no tensor of the step once every sibling took its columns)
    group = m.q_proj.forward.args[0]
    assert group.last_input is None and group.kept == {}
    assert projections.install(m) == 1 and m.q_proj.forward.args[0] is group  # installed once
    assert projections.uninstall(m) == 3
    linear.calls = 0
    assert torch.allclose(m(x), brute(m, x), rtol=0, atol=1e-12) and linear.calls == 3


@pytest.mark.parametrize("bias", [False, True])
def test_members_of_one_size_come_out_contiguous(bias: bool, linear: Counting) -> None:
    """gate / up (one output size) run as one batched GEMM: each result is its own contiguous
    tensor, so the activation and the product after them read contiguous memory."""
    m = MLP(bias)
    x = torch.randn(2, 3, 8, dtype=torch.float64)  # (leading dims kept)
    want = [x @ p.weight.T + (0 if p.bias is None else p.bias) for p in (m.gate_proj, m.up_proj)]
    expected = m(x)
    assert projections.install(m) == 1
    linear.calls = 0
    gate = m.gate_proj(x)
    up = m.up_proj(x)
    assert linear.calls == 1 and gate.is_contiguous() and up.is_contiguous()
    assert gate.shape == up.shape == (2, 3, 6)
    assert torch.allclose(gate, want[0], rtol=0, atol=1e-12) and torch.allclose(up, want[1], rtol=0, atol=1e-12)
    linear.calls = 0
    assert torch.allclose(m(x), expected, rtol=0, atol=1e-12) and linear.calls == 2  # (gate / up, down)


def test_a_member_serves_itself_when_the_fused_gemm_cannot(linear: Counting) -> None:
    m = Attention()
    projections.install(m)
    x, y = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    want_x, want_y = brute(m, x), brute(m, y)
    # out of order, and a sibling called on another tensor: each gets its own columns
    k = m.k_proj(x)
    v_of_y = m.v_proj(y)  # (not the input the fused GEMM saw: its own projection)
    q = m.q_proj(x)
    assert torch.allclose(k, want_x[:, 12:16], atol=1e-12) and torch.allclose(q, want_x[:, :12], atol=1e-12)
    assert torch.allclose(v_of_y, want_y[:, 16:], atol=1e-12)
    # the weights replaced (a reload or a move that does not keep them stacked): one GEMM each
    m.k_proj.weight = torch.nn.Parameter(m.k_proj.weight.detach().clone() * 2)
    linear.calls = 0
    out = m(x)
    assert linear.calls == 3 and torch.allclose(out, brute(m, x), atol=1e-12)
    assert torch.allclose(out[:, 12:16], 2 * want_x[:, 12:16], atol=1e-12)
    # installed again (the next engine on the moved model): stacked anew, one GEMM
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert projections.install(m) == 1
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    linear.calls = 0
    assert torch.allclose(m(x), out, atol=1e-12) and linear.calls == 1


def test_only_plain_linears_of_one_shape_are_fused() -> None:
    class Sub(torch.nn.Linear):  # (a quantized or adapted layer: other weights)
        pass

    m = Attention()
    m.k_proj = Sub(8, 4)
    assert projections.install(m) == 0
    m = Attention()
    m.v_proj = torch.nn.Linear(6, 4)  # another input size
    assert projections.install(m) == 0
    m = Attention(bias=True)
    m.v_proj.bias = None  # biases on some only
    assert projections.install(m) == 0


def test_the_engine_runs_each_layer_with_two_gemms_and_the_same_logits(linear: Counting) -> None:
    """Gemma-3: q / k / v and gate / up fused in every layer (2 GEMMs where there were 5: with
    o_proj and down_proj 4 a layer instead of 7, and the LM head once a step); the logits of a
    run with and without them agree to float32 rounding. (The engine's attention calls no
    GEMM through these functions.)"""
    model = build_model("gemma3_text", seed=0)
    layers = model.config.num_hidden_layers
    runs = {}
    for fused in (True, False):  # (the second engine gives the modules their own forward back)
        eng = Engine(model, EngineConfig(gpu_bytes=1 << 20, host_bytes=0, max_seq_len=64, tokens_per_block=4,
                                         max_batch_size=4, token_budget=32, prefill_chunk_tokens=8, keep_logits=True,
                                         fused_projections=fused))
        assert eng.projections == (2 * layers if fused else 0)
        for p in ([1, 2, 3, 4, 5], list(range(20, 33))):
            eng.add_request(np.array(p), 4)
        linear.calls, steps = 0, 0
        events = []
        while eng.has_work:
            events += eng.step()
            steps += 1
        assert linear.calls == steps * ((4 if fused else 7) * layers + 1)
        runs[fused] = events
    assert [e.token for e in runs[True]] == [e.token for e in runs[False]]
    assert max(float((a.logits - b.logits).abs().max()) for a, b in zip(runs[True], runs[False], strict=True)) < 1e-5
    assert projections.uninstall(model) == 0
