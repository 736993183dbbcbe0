"""Mamba-1's scan continued from a state (``runtime/mamba1.py``): split anywhere, the scan from
the first part's state gives what transformers' own scan gives over the whole sequence; the
engine's Jamba continues prefill chunks, prefix hits and forks through it."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
torch.set_num_threads(1)

from hybridkv.runtime import mamba1  # noqa: E402
from hybridkv.runtime.engine import Engine  # noqa: E402
from hybridkv.runtime.model import build_model  # noqa: E402

JAMBA = "transformers.models.jamba.modeling_jamba"


def _inputs(seed: int, batch: int = 2, channels: int = 6, n: int = 4, length: int = 11) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return {"x": r(batch, channels, length), "dt": r(batch, channels, length), "A": -r(channels, n).abs(),
            "B": r(batch, n, length), "C": r(batch, n, length), "D": r(channels), "z": r(batch, channels, length),
            "delta_bias": r(channels), "delta_softplus": True}


def _original() -> Any:
    import transformers.models.jamba.modeling_jamba  # noqa: F401

    scan = getattr(sys.modules[JAMBA], mamba1.FUNCTION)
    return scan.args[0] if getattr(scan, "hybridkv_continues", False) else scan


@pytest.mark.parametrize("split", [1, 4, 10])
def test_a_scan_continued_from_a_state_is_the_whole_scan(split: int) -> None:
    original, a = _original(), _inputs(split)

    def part(lo: int, hi: int) -> dict[str, Any]:
        return {k: (v[..., lo:hi] if k in ("x", "dt", "B", "C", "z") else v) for k, v in a.items()}

    whole, last = original(a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], z=a["z"], delta_bias=a["delta_bias"],
                           delta_softplus=True, return_last_state=True)
    first = part(0, split)
    head, state = original(first.pop("x"), first.pop("dt"), first.pop("A"), first.pop("B"), first.pop("C"),
                           return_last_state=True, **first)
    tail, end = mamba1.scan_from(state, **part(split, a["x"].shape[-1]), return_last_state=True)
    assert torch.allclose(torch.cat([head, tail], dim=-1), whole, atol=1e-12)
    assert torch.allclose(end, last.double(), atol=1e-12)
    # from a zero state it is the module's own scan
    zero = torch.zeros_like(state)
    assert torch.allclose(mamba1.scan_from(zero, **a), whole, atol=1e-12)


def test_the_wrapped_scan_runs_the_original_unless_a_state_is_set() -> None:
    model = build_model("jamba", seed=0)
    Engine(model)  # installs the wrapper
    wrapped = getattr(sys.modules[JAMBA], mamba1.FUNCTION)
    assert getattr(wrapped, "hybridkv_continues", False)
    a = _inputs(3)
    plain = wrapped(a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], z=a["z"], delta_bias=a["delta_bias"],
                    delta_softplus=True)
    assert torch.equal(plain, _original()(a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], z=a["z"],
                                          delta_bias=a["delta_bias"], delta_softplus=True))
    state = torch.randn(2, 6, 4, dtype=torch.float64)
    with mamba1.continuing(state):
        got = wrapped(a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], z=a["z"], delta_bias=a["delta_bias"],
                      delta_softplus=True)
    assert torch.equal(got, mamba1.scan_from(state, **a)) and not torch.allclose(got, plain)
    Engine(model)  # a second engine does not wrap twice
    assert getattr(sys.modules[JAMBA], mamba1.FUNCTION) is wrapped


def test_jamba_continues_prefill_chunks_through_the_scan(monkeypatch: Any) -> None:
    """Chunks of 8 over prompts of 9-36 tokens: every chunk after a request's first continues
    its state through ``scan_from``; the logits stay within 1e-6 of transformers run whole
    (the module's zero-start scan would be 4e-5 off)."""
    import test_engine

    calls = []
    scan_from = mamba1.scan_from
    monkeypatch.setattr(mamba1, "scan_from", lambda state, **kw: calls.append(state.shape) or scan_from(state, **kw))
    engine = Engine(build_model("jamba", seed=0), test_engine.config())
    events, done = test_engine.run_scenario(engine)
    assert calls and done["fork"] == 4
    assert test_engine.check_against_transformers("jamba", engine, events) <= 1e-6
    assert np.all([shape[0] == 1 for shape in calls])  # one request's run at a time
