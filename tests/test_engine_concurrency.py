"""A sliding-window model holds more concurrent requests than the same model run as all full
attention, by the factor the plan predicts, measured through the reference engine
(benchmarks/bench_concurrency.py does the measuring)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_concurrency.py"


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("bench_concurrency", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_window_layers_hold_the_predicted_factor_more_requests() -> None:
    """Window 16, 4-token pages, 384 KiB, requests of 128 tokens: the plan predicts 8.17
    requests with the window layers and 3.00 with every layer full; the engine's scheduler
    runs exactly the whole part of each at its peak, and every request completes."""
    bench = _bench()
    r = bench.measure(requests=24, window=16, length=128, tpb=4, gpu_bytes=384 * 1024)  # type: ignore[attr-defined]
    w, f = r["windowed"], r["all_full"]
    assert (round(w["predicted"], 2), round(f["predicted"], 2)) == (8.17, 3.00)
    peaks = (w["measured_peak"], f["measured_peak"])
    assert peaks == (math.floor(w["predicted"]), math.floor(f["predicted"])) == (8, 3)
    assert w["completed"] == f["completed"] == 24
    assert r["measured_factor"] == 8 / 3
