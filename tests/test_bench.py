"""The step benchmark: its command runs and its workload leaves the manager correct (no timing)."""

from __future__ import annotations

import json

import pytest

from hybridkv.cli.bench import bench_layout, bench_step, bookkeeping_memory, make_manager, run_once
from hybridkv.cli.main import main

KEYS = {"batch", "steps", "us_per_step_median", "us_per_request_step_median", "step_call_us_per_step_median"}


def test_cli_bench_step_json_one_batch(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "step", "--batch", "8", "--steps", "5", "--repeats", "1", "--json"])
    out, err = capsys.readouterr()
    assert (rc, err) == (0, "")
    result = json.loads(out)
    assert set(result) >= KEYS
    assert (result["batch"], result["steps"], result["layout"], result["pool_groups"]) == (8, 5, "vllm", 1)


def test_cli_bench_step_json_several_batches(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "step", "--batch", "2", "3", "--steps", "3", "--repeats", "1", "--layout", "three-group",
               "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0
    results = json.loads(out)["results"]
    assert [r["batch"] for r in results] == [2, 3]
    assert all(set(r) >= KEYS and r["pool_groups"] == 3 for r in results)


def test_cli_bench_step_text_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "step", "--batch", "4", "--steps", "2", "--repeats", "1"]) == 0
    assert "step call" in capsys.readouterr().out
    assert main(["bench", "step", "--batch", "0", "--steps", "2"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["vllm", "three-group"])
def test_run_once_checked_final_state(layout: str) -> None:
    # check=True: check_invariants + exact final lengths before closing, nothing in use after
    run_once(layout, batch=5, steps=40, check=True)


def test_bench_step_checked_interleaved() -> None:
    results = bench_step((3, 7), steps=17, repeats=2, check=True)
    assert [(r.batch, r.steps, r.repeats) for r in results] == [(3, 17, 2), (7, 17, 2)]


def test_manager_pools_hold_the_workload() -> None:
    m = make_manager(bench_layout("three-group"), batch=4, steps=10)
    assert len(m.plan.pool_groups) == 3
    assert m.config.max_active_requests == 4 and not m.config.storage.with_data
    full = m.plan.pool_groups[2]
    assert full.slots >= 4 * -(-2010 // 16)


def test_bookkeeping_memory_counts_tables_and_allocators() -> None:
    m = bookkeeping_memory(num_slots=4096, max_active_requests=8, max_seq_len=8192)
    assert m.num_slots == 4096
    # two int32 tables of 8 x 512 entries, one int32 stack + one bool bitmap per slot (plus headers)
    assert m.bytes_by_part["block tables"] >= 2 * 8 * 512 * 4
    assert m.bytes_by_part["allocators (free stacks + in_use bitmaps, every tier)"] >= 4096 * 5
    assert m.bytes_per_slot == sum(m.bytes_by_part.values()) / 4096
