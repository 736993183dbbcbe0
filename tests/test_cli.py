"""The ``hybridkv`` command, run in-process through cli.main (plus one real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hybridkv.cli.main import main
from hybridkv.layouts.catalog import ENTRIES

NAMES = [e.name for e in ENTRIES]
POOL_GROUP_KEYS = {"id", "kind", "window", "sink_tokens", "layer_ids", "slot_bytes", "slots", "min_slots",
                   "bytes"}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def plan_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    rc, out, err = run(capsys, "plan", *argv, "--json")
    assert (rc, err) == (0, "")
    result: dict[str, Any] = json.loads(out)
    return result


def test_models_lists_every_catalog_name(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "models")
    assert (rc, err) == (0, "")
    names = {line.split()[0] for line in out.splitlines()[1:-1]}
    assert names == set(NAMES)
    assert "gemma-3-27b" in out


def test_models_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "models", "--json")
    assert rc == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == NAMES
    by_name = {r["name"]: r for r in rows}
    assert by_name["deepseek-v3"]["kv_bytes_per_token"] == 61 * 1152
    assert by_name["gemma-3-27b"]["kv_bytes_per_token"] == 62 * 8192


@pytest.mark.parametrize("name", NAMES)
def test_plan_json_every_catalog_model(capsys: pytest.CaptureFixture[str], name: str) -> None:
    j = plan_json(capsys, name, "--gpu-mem", "40GiB")
    assert {"model", "tokens_per_block", "max_batch_size", "max_seq_len", "gpu_bytes",
            "max_concurrency_at_max_seq_len", "pool_groups"} <= set(j)
    assert j["model"] == name
    assert j["gpu_bytes"] == 40 * 1024**3
    assert j["tokens_per_block"] == 16
    assert j["max_batch_size"] == 32
    entry = next(e for e in ENTRIES if e.name == name)
    assert j["max_seq_len"] == min(entry.max_position_embeddings, 32768)
    assert j["max_concurrency_at_max_seq_len"] >= 1
    groups = j["pool_groups"]
    assert groups
    assert [g["id"] for g in groups] == list(range(len(groups)))
    layer_ids: list[int] = []
    for g in groups:
        assert set(g) >= POOL_GROUP_KEYS
        assert g["kind"] in ("attention", "ssm", "mixed")
        assert g["slots"] >= g["min_slots"] >= 1
        assert g["bytes"] == g["slots"] * g["slot_bytes"]
        layer_ids += g["layer_ids"]
    assert sorted(layer_ids) == list(range(len(entry.layout().layers)))
    assert sum(g["bytes"] for g in groups) <= j["gpu_bytes"]


def test_plan_json_gemma3_27b_pool_groups(capsys: pytest.CaptureFixture[str]) -> None:
    j = plan_json(capsys, "gemma-3-27b", "--gpu-mem", "40GiB", "--pools", "per-lifecycle")
    sliding, full = j["pool_groups"]
    assert (sliding["kind"], sliding["window"], sliding["sink_tokens"]) == ("attention", 1024, 0)
    assert sliding["layer_ids"] == [i for i in range(62) if (i + 1) % 6 != 0]
    assert sliding["slot_bytes"] == 52 * 8192 * 16
    assert (full["kind"], full["window"]) == ("attention", None)
    assert full["layer_ids"] == [5, 11, 17, 23, 29, 35, 41, 47, 53, 59]
    assert full["slot_bytes"] == 10 * 8192 * 16
    assert full["min_slots"] == 32768 // 16  # one request of max_seq_len alone


def test_plan_json_ssm_pool_group(capsys: pytest.CaptureFixture[str]) -> None:
    j = plan_json(capsys, "qwen3-next-80b-a3b", "--gpu-mem", "40GiB", "--pools", "per-lifecycle")
    ssm = next(g for g in j["pool_groups"] if g["kind"] == "ssm")
    assert ssm["window"] is None
    assert ssm["slot_bytes"] == 36 * 1_097_728
    assert ssm["min_slots"] == 32  # one state per request, max_batch_size requests


def test_plan_json_ssm_state_slices_in_the_arena(capsys: pytest.CaptureFixture[str]) -> None:
    """Shared mode: the 36 layers' states (36 x 1,097,728 B) are 101 slices of the 393,216 B
    page (12 full layers x 32 KiB), the last one half used; one pool, no own pools."""
    j = plan_json(capsys, "qwen3-next-80b-a3b", "--gpu-mem", "40GiB")
    assert (j["page_bytes"], j["own_pools"], j["tables_per_step"], j["families"]) == (393_216, [], 102, 2)
    (pool,) = j["pool_groups"]
    assert pool["kind"] == "mixed" and len(pool["layer_ids"]) == 48
    slices = [lg for lg in pool["layer_groups"] if lg["state_slice"] is not None]
    assert [lg["state_slice"] for lg in slices] == [[k, 101] for k in range(101)]
    assert [lg["used_bytes"] for lg in slices] == [393_216] * 100 + [36 * 1_097_728 - 100 * 393_216]
    assert j["padding_bytes"] == 393_216 // 2


def test_plan_options_are_applied(capsys: pytest.CaptureFixture[str]) -> None:
    j = plan_json(capsys, "llama-4-scout", "--gpu-mem", "40GiB", "--max-seq-len", "8k",
                  "--max-batch-size", "8", "--tokens-per-block", "32", "--constraint", "4x8k@0",
                  "--host-mem", "1GiB")
    assert (j["max_seq_len"], j["max_batch_size"], j["tokens_per_block"]) == (8192, 8, 32)
    assert j["host_bytes"] == 1024**3
    assert j["constraints"] == ["constraint0=4x8k@0"]
    assert sum(g["bytes"] for g in j["pool_groups"]) <= j["gpu_bytes"]


def test_plan_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "plan", "gemma-3-27b", "--gpu-mem", "40GiB")
    assert (rc, err) == (0, "")
    assert "max concurrency" in out
    assert out.startswith("model gemma-3-27b: KV quota 40.00 GiB")


def test_plan_table_notes_unverified_values(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "plan", "jamba-1.5-mini", "--gpu-mem", "40GiB")
    assert rc == 0
    assert "note (unverified catalog value)" in out


def test_plan_from_layout_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"name": "tiny", "max_position_embeddings": 4096, "layers": [
        {"type": "attention", "window": 256, "kv_bytes_per_token": 1024, "count": 3},
        {"type": "attention", "kv_bytes_per_token": 1024}]}), encoding="utf-8")
    j = plan_json(capsys, str(path), "--gpu-mem", "1GiB", "--pools", "per-lifecycle")
    assert j["model"] == "tiny"
    assert j["max_seq_len"] == 4096
    assert [g["layer_ids"] for g in j["pool_groups"]] == [[0, 1, 2], [3]]


# --- user errors: exit code 2, one line on stderr, no traceback ----------------------------

def _bad_layout(tmp_path: Path) -> str:
    path = tmp_path / "bad.json"
    path.write_text('{"name": "m", "layers": [\n', encoding="utf-8")
    return str(path)


USER_ERRORS: list[tuple[str, list[str], str]] = [
    ("unknown model", ["plan", "no-such-model", "--gpu-mem", "40GiB"], "unknown model 'no-such-model'"),
    ("gpu-mem 0", ["plan", "gemma-3-27b", "--gpu-mem", "0"], "--gpu-mem"),
    ("gpu-mem -3", ["plan", "gemma-3-27b", "--gpu-mem", "-3"], "--gpu-mem"),
    ("gpu-mem abc", ["plan", "gemma-3-27b", "--gpu-mem", "abc"], "--gpu-mem"),
    ("quota below floors", ["plan", "gemma-3-27b", "--gpu-mem", "1MiB"], "Raise --gpu-mem"),
    ("max-batch-size 0", ["plan", "gemma-3-27b", "--gpu-mem", "40GiB", "--max-batch-size", "0"],
     "--max-batch-size"),
    ("tokens-per-block 0", ["plan", "gemma-3-27b", "--gpu-mem", "40GiB", "--tokens-per-block", "0"],
     "--tokens-per-block"),
    ("max-seq-len 0", ["plan", "gemma-3-27b", "--gpu-mem", "40GiB", "--max-seq-len", "0"], "--max-seq-len"),
    ("max-seq-len junk", ["plan", "gemma-3-27b", "--gpu-mem", "40GiB", "--max-seq-len", "long"],
     "--max-seq-len"),
    ("bad constraint", ["plan", "gemma-3-27b", "--gpu-mem", "40GiB", "--constraint", "4k"], "--constraint"),
    ("constraint option", ["plan", "gemma-3-27b", "--gpu-mem", "40GiB", "--constraint", "1x4k,x=1"],
     "--constraint"),
    ("constraint too long", ["plan", "gemma-3-27b", "--gpu-mem", "40GiB", "--constraint", "1x64k"],
     "--max-seq-len"),
    ("bad typical", ["plan", "gemma-3-27b", "--gpu-mem", "40GiB", "--typical", "lots"], "--typical"),
    ("bad host-mem", ["plan", "gemma-3-27b", "--gpu-mem", "40GiB", "--host-mem", "x"], "--host-mem"),
]


@pytest.mark.parametrize(("argv", "needle"), [(a, n) for _, a, n in USER_ERRORS],
                         ids=[i for i, _, _ in USER_ERRORS])
def test_user_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert out == ""
    assert err.startswith("hybridkv: error: ")
    assert needle in err
    assert "Traceback" not in err
    assert err.count("\n") == 1


def test_quota_below_floors_names_the_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "plan", "gemma-3-27b", "--gpu-mem", "1MiB", "--pools", "per-lifecycle")
    assert rc == 2
    # floors: 2080 sliding slots x (52 x 8192 x 16) B + 2048 full slots x (10 x 8192 x 16) B
    need = 2080 * 52 * 8192 * 16 + 2048 * 10 * 8192 * 16
    assert f"Raise --gpu-mem to at least {need} B" in err
    assert "--gpu-mem 1048576 B" in err


def test_malformed_layout_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _bad_layout(tmp_path)
    rc, out, err = run(capsys, "plan", path, "--gpu-mem", "40GiB")
    assert (rc, out) == (2, "")
    assert err.startswith(f"hybridkv: error: {path}: malformed JSON at line 2")
    assert "Traceback" not in err


def test_invalid_layout_field(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"name": "m", "layers": [{"type": "attention", "kv_bytes_per_token": 8,
                                                         "window": 0}]}), encoding="utf-8")
    rc, _, err = run(capsys, "plan", str(path), "--gpu-mem", "40GiB")
    assert rc == 2
    assert err.startswith(f"hybridkv: error: {path}: layers[0]: field 'window'")


@pytest.mark.parametrize("argv", [
    ["plan", "gemma-3-27b"],  # --gpu-mem is required
    ["plan", "gemma-3-27b", "--gpu-mem", "40GiB", "--max-batch-size", "many"],
    ["frobnicate"],
    [],
])
def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    _, err = capsys.readouterr()
    assert "hybridkv: error: " in err
    assert "Traceback" not in err


def test_module_runs_as_a_subprocess() -> None:
    proc = subprocess.run([sys.executable, "-m", "hybridkv.cli.main", "plan", "gemma-3-27b", "--gpu-mem", "40GiB"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "max concurrency" in proc.stdout
    assert proc.stderr == ""


def test_module_subprocess_user_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "hybridkv.cli.main", "plan", "gemma-3-27b", "--gpu-mem", "0"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("hybridkv: error: --gpu-mem")
    assert "Traceback" not in proc.stderr
