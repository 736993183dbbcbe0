"""The engine's benchmark scripts run end to end on the CPU at tiny sizes, so they do not rot
between GPU sessions: ``bench_engine.py --tiny`` (every timed variant, the agreement check, the
transformers baseline), ``bench_sampling.py`` and ``bench_recurrent_decode.py``. They assert what the scripts compute
exactly (positions, rows, tokens), never a timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

_ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(_ROOT / "benchmarks" / script), *args], capture_output=True,
                         text=True, env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_bench_engine_tiny_runs_every_variant(tmp_path: Path) -> None:
    path = tmp_path / "e.json"
    _run("bench_engine.py", "--tiny", "--batch", "3", "--context", "20", "--steps", "2", "--agree-steps", "4",
         "--json", str(path))
    result = json.loads(path.read_text())
    agreement = result["agreement"]
    # 4 prompts x 4 steps; the engine runs in bf16 against float32 (16 of 16 here, but CPUs
    # round bf16 matmuls differently, and a random model's logits are flat)
    assert agreement["positions"] == 16 and agreement["agree"] >= 12
    (row,) = result["decode"]
    assert (row["batch"], row["context"]) == (3, 20)
    hk = row["hybridkv"]
    for variant in ("graphs", "sequential", "graphs_own_modules", "eager"):
        assert hk[variant]["step_ms"] > 0
    # 3 runs of 2 steps, on the CPU over the padded static step ("eager" graphs)
    assert hk["graphs"]["graph_steps"] == hk["sequential"]["graph_steps"] == 6
    assert hk["eager"]["graph_steps"] == 0
    assert hk["fused_projections"] == 2 * 2 and hk["compiled_rotary"] == []  # (2 layers; a CPU compiles nothing)
    assert "step_ms" in row["transformers"]  # (a difference of two timings: any sign at this size)


def test_bench_sampling_runs(tmp_path: Path) -> None:
    (row,) = json.loads(_run("bench_sampling.py", "--rows", "3", "--vocab", "1000", "--repeats", "1", "--json"))
    assert (row["rows"], row["vocab"]) == (3, 1000) and row["per_request_ms"] > 0 and row["batched_ms"] > 0


def test_bench_recurrent_decode_runs() -> None:
    (row,) = json.loads(_run("bench_recurrent_decode.py", "--family", "bamba", "--batch", "3", "--steps", "2",
                             "--json"))
    assert (row["family"], row["batch"]) == ("bamba", 3) and row["same_tokens"] is True
    assert row["batched_ms"] > 0 and row["per_request_ms"] > 0
