"""The bad inputs of the issue "zero tracebacks from the console script", one test each: every
one is a single error line with exit code 2 that names the setting, the bound and the fix;
two of them also through the real console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import test_hf_config as hf
from cli_run import Outcome, check

GEMMA = ["gemma-3-27b", "--gpu-mem"]
ISSUE_EXAMPLES: list[tuple[str, list[str], str]] = [
    ("gpu-mem of 400 digits", ["plan", *GEMMA, "9" * 400], "--gpu-mem must be <= 1152921504606846976 B (2^60), "
                                                           "got a 400-digit size"),
    ("model name of 300 characters", ["plan", "a" * 300, "--gpu-mem", "40GiB"], "unknown model 'aaaa"),
    ("model file name of 300 characters", ["plan", "a" * 300 + ".json", "--gpu-mem", "40GiB"],
     "cannot read the model file (File name too long)"),
    ("max-seq-len of 20 digits", ["plan", *GEMMA, "40GiB", "--max-seq-len", "99999999999999999999"],
     "--max-seq-len must be <= 1099511627776 tokens (2^40), got 99999999999999999999 tokens"),
    ("constraint of 10^11 requests", ["plan", *GEMMA, "80GiB", "--constraint", "99999999999x1"],
     "--constraint '99999999999x1': requests must be <= 1048576 (2^20), got 99999999999"),
    ("negative seed", ["simulate", *GEMMA, "40GiB", "--workload", "chat", "--requests", "2", "--seed", "-1"],
     "--seed must be in [0, 2^64 - 1]"),
    ("active params 1e400", ["simulate", *GEMMA, "40GiB", "--workload", "chat", "--requests", "2",
                             "--active-params", "1e400"], "--active-params must be <= 1e+15, got '1e400'"),
    ("bench batch of 20 digits", ["bench", "step", "--batch", "99999999999999999999", "--steps", "1", "--repeats", "1"],
     "bench step: --batch must be <= 65536 (2^16), got 99999999999999999999"),
    ("gpu-mem 10^30 GiB", ["plan", *GEMMA, "1000000000000000000000000000000GiB"],
     "--gpu-mem must be <= 1152921504606846976 B (2^60), got a 31-digit size"),
    ("rate inf", ["simulate", *GEMMA, "40GiB", "--workload", "chat", "--requests", "2", "--rate", "inf"],
     "--rate must be > 0 requests/s and finite"),
    # what one simulation may hold (sim/simulator.py: MAX_SIM_*); a plan alone takes these sizes
    ("simulate 2^60 B of slots", ["simulate", *GEMMA, "1048576TiB", "--workload", "chat", "--requests", "2",
                                  "--pools", "per-lifecycle"],
     "simulate: slots of the plan ((23962533379, 755004128650) GPU) must be <= 16777216 (2^24)"),
    ("simulate 2^20 rows", ["simulate", *GEMMA, "1048576TiB", "--workload", "chat", "--requests", "2",
                            "--max-batch-size", "1048576"], "simulate: --max-batch-size (1048576) x blocks of"),
    ("simulate 32m tokens", ["simulate", *GEMMA, "1048576TiB", "--workload", "chat", "--requests", "2",
                             "--max-seq-len", "32m"], "simulate: --max-seq-len must be <= 16777216 (2^24)"),
    ("simulate 64 x 16m tokens", ["simulate", *GEMMA, "4TiB", "--workload", "long-context", "--requests", "64",
                                  "--max-seq-len", "16m"], "simulate: tokens of the workload's sessions must be <="),
]


@pytest.mark.parametrize(("argv", "needle"), [(a, n) for _, a, n in ISSUE_EXAMPLES],
                         ids=[i for i, _, _ in ISSUE_EXAMPLES])
def test_issue_example(argv: list[str], needle: str) -> None:
    r = check(argv)
    assert r.code == 2
    assert needle in r.err


def plan_file(tmp_path: Path, text: str, *options: str) -> Outcome:
    path = tmp_path / "model.json"
    path.write_text(text, encoding="utf-8")
    return check(["plan", str(path), "--gpu-mem", "40GiB", "--json", *options])


LAYER = {"type": "attention", "kv_bytes_per_token": 8}


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("count", 10**12, "field 'count' must be <= 65536 (2^16), got 1000000000000"),
    ("window", 10**13, "field 'window' must be <= 1099511627776 (2^40), got 10000000000000"),
    ("kv_bytes_per_token", 2**61, "field 'kv_bytes_per_token' must be <= 1152921504606846976 (2^60)"),
])
def test_layout_huge_field(tmp_path: Path, field: str, value: int, needle: str) -> None:
    r = plan_file(tmp_path, json.dumps({"name": "m", "layers": [{**LAYER, field: value}]}))
    assert r.code == 2
    assert "layers[0]: " + needle in r.err


def test_layout_window_of_a_trillion_tokens_plans(tmp_path: Path) -> None:
    """Under the bound, a huge window is no error and no dense scan of a trillion positions."""
    r = plan_file(tmp_path, json.dumps({"name": "m", "layers": [{**LAYER, "window": 10**12}]}), "--max-seq-len",
                  str(2**40))
    assert r.code == 2 and "cannot hold the pool floors" in r.err  # 2^36 blocks of one request: > 40 GiB


def test_layout_nested_100_000_deep(tmp_path: Path) -> None:
    r = plan_file(tmp_path, '{"name": "m", "layers": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert r.code == 2
    assert "JSON nested too deeply to read" in r.err


def test_layout_one_byte_per_token_is_one_buffer(tmp_path: Path) -> None:
    r = plan_file(tmp_path, json.dumps({"name": "m", "layers": [{"type": "attention", "kv_bytes_per_token": 1}]}))
    assert r.code == 0
    assert json.loads(r.out)["pool_groups"][0]["slot_bytes"] == 16  # 1 B x 16 tokens, no empty K / V halves


@pytest.mark.parametrize(("layer_types", "needle"), [
    ([["sliding_attention"], "full_attention"] * 12, "entry 0 is ['sliding_attention']"),
    ([1, "full_attention"] * 12, "entry 0 is 1"),
])
def test_hf_layer_types_not_strings(tmp_path: Path, layer_types: list[Any], needle: str) -> None:
    r = plan_file(tmp_path, json.dumps({**hf.GPT_OSS_20B, "layer_types": layer_types}))
    assert r.code == 2
    assert "field 'layer_types' must list layer type names (strings); " + needle in r.err


def test_fifo_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "f.json"
    os.mkfifo(fifo)
    r = check(["plan", str(fifo), "--gpu-mem", "1TiB"])
    assert r.err == f"hybridkv: error: {fifo}: not a regular file; give a layout JSON or config.json file\n"


def test_directory_and_unreadable_path(tmp_path: Path) -> None:
    (tmp_path / "d.json").mkdir()
    (tmp_path / "plain").write_text("{}", encoding="utf-8")
    assert "d.json: a directory;" in check(["plan", str(tmp_path / "d.json"), "--gpu-mem", "1GiB"]).err
    r = check(["plan", str(tmp_path / "plain" / "m.json"), "--gpu-mem", "1GiB"])  # a file used as a folder
    assert "m.json: cannot read the model file (Not a directory)" in r.err


def test_a_newline_in_a_path_stays_on_one_line(tmp_path: Path) -> None:
    r = check(["plan", str(tmp_path / "a\nb.json"), "--gpu-mem", "1GiB"])
    assert "a\\nb.json: cannot read the model file" in r.err


def _console_script() -> list[str]:
    script = shutil.which("hybridkv")
    return [script] if script else [sys.executable, "-m", "hybridkv.cli.main"]


@pytest.mark.parametrize("argv", [["plan", "gemma-3-27b", "--gpu-mem", "9" * 400],
                                  ["plan", "FIFO", "--gpu-mem", "1TiB"]], ids=["gpu-mem of 400 digits", "FIFO"])
def test_console_script_prints_one_line(tmp_path: Path, argv: list[str]) -> None:
    fifo = tmp_path / "f.json"
    os.mkfifo(fifo)
    argv = [str(fifo) if a == "FIFO" else a for a in argv]
    proc = subprocess.run([*_console_script(), *argv], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("hybridkv: error: ") and proc.stderr.count("\n") == 1, proc.stderr
