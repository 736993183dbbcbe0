"""The simulator: workloads, cost model, baseline planner, the issue-15401 scenario with both
planners, policies, results and the CLI; a property test that the guaranteed planner never
deadlocks and every admitted request completes on random small layouts."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridkv.cli.main import main
from hybridkv.core.types import GIB
from hybridkv.layouts.catalog import BY_NAME
from hybridkv.layouts.grouping import POOL_MODES, group_layers
from hybridkv.layouts.models import load_model
from hybridkv.layouts.spec import LayerSpec, ModelLayout, attention_layer, ssm_layer
from hybridkv.lifecycles import Chunked, Full, Sliding
from hybridkv.manager.manager import KVCacheManager, ManagerConfig
from hybridkv.manager.tiers import StorageConfig
from hybridkv.planning.demand import demand
from hybridkv.planning.planner import PlanSpec, compute_floors, plan
from hybridkv.planning.report import ideal_bytes_per_request
from hybridkv.scheduler.request import SeqRequest, Status
from hybridkv.scheduler.scheduler import Scheduler, SchedulerConfig
from hybridkv.sim import (
    GPUS,
    WORKLOADS,
    CostModel,
    LiveKvBytes,
    Session,
    SimConfig,
    SimProgress,
    Simulator,
    Turn,
    Workload,
    WorkloadSpec,
    make_workload,
    simulate,
    single_request_plan,
)

ISSUE_LEN, ISSUE_TPB, ISSUE_BATCH = 137984, 256, 64
ISSUE_FLOOR_BYTES = 3748659200  # what `hybridkv plan issue-15401 ... --gpu-mem 1GiB` says it needs
ISSUE_GPU_BYTES = ISSUE_FLOOR_BYTES * 105 // 100


def issue_spec() -> PlanSpec:
    return PlanSpec(load_model("issue-15401"), gpu_bytes=ISSUE_GPU_BYTES, max_seq_len=ISSUE_LEN,
                    tokens_per_block=ISSUE_TPB, max_batch_size=ISSUE_BATCH)


def cost_for(layout: ModelLayout, params: float = 8e9) -> CostModel:
    return CostModel(layout, GPUS["h100"], params)


# ---- workloads ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(WORKLOADS))
@pytest.mark.parametrize("max_seq_len", [64, 4096, 32768])
def test_workload_is_deterministic_and_fits(name: str, max_seq_len: int) -> None:
    spec = WorkloadSpec(name, max_seq_len, 16, num_requests=40, seed=7)
    a, b = make_workload(spec), make_workload(spec)
    assert a == b
    assert make_workload(WorkloadSpec(name, max_seq_len, 16, num_requests=40, seed=8)) != a
    assert a.num_requests == 40
    for s in a.sessions:
        assert s.arrival_s == 0.0
        for t in s.turns:
            assert t.prompt_tokens >= 1 and t.max_new_tokens >= 1
            assert t.prompt_tokens + t.max_new_tokens - 1 <= max_seq_len


def test_workload_shapes() -> None:
    lc = make_workload(WorkloadSpec("long-context", 10000, 16, num_requests=50))
    assert all(5000 <= s.turns[0].prompt_tokens <= 9000 and 64 <= s.turns[0].max_new_tokens <= 512
               for s in lc.sessions)
    dh = make_workload(WorkloadSpec("decode-heavy", 32768, 16, num_requests=50))
    assert all(64 <= s.turns[0].prompt_tokens <= 256 and 1024 <= s.turns[0].max_new_tokens <= 4096
               for s in dh.sessions)
    chat = make_workload(WorkloadSpec("chat", 4096, 16, num_requests=500))
    prompts = [s.turns[0].prompt_tokens for s in chat.sessions]
    assert max(prompts) <= 2048 and 500 < float(np.median(prompts)) < 2000
    issue = make_workload(WorkloadSpec("issue-15401", ISSUE_LEN, ISSUE_TPB, num_requests=64))
    outs = [s.turns[0].max_new_tokens for s in issue.sessions]
    assert min(outs) >= ISSUE_TPB  # every decode crosses every position mod tokens_per_block
    assert max(s.turns[0].prompt_tokens for s in issue.sessions) > ISSUE_LEN * 3 // 4


def test_multi_turn_resends_the_conversation() -> None:
    wl = make_workload(WorkloadSpec("multi-turn", 32768, 16, num_requests=60, seed=3))
    assert wl.num_requests == 60
    assert any(len(s.turns) >= 3 for s in wl.sessions)
    for s in wl.sessions:
        assert s.turns[0].think_s == 0.0
        for prev, t in itertools.pairwise(s.turns):
            assert t.prompt_tokens > prev.prompt_tokens + prev.max_new_tokens  # + a new user message
            assert t.think_s > 0


def test_poisson_arrivals() -> None:
    wl = make_workload(WorkloadSpec("chat", 4096, 16, num_requests=400, seed=1, rate_per_s=10.0))
    t = np.asarray([s.arrival_s for s in wl.sessions])
    assert (np.diff(t) > 0).all() and t[0] > 0
    assert 30 < t[-1] < 50  # 400 arrivals at 10/s


def test_workload_spec_errors() -> None:
    with pytest.raises(Exception, match="unknown workload"):
        WorkloadSpec("nope", 100, 16)
    with pytest.raises(Exception, match="--rate"):
        WorkloadSpec("chat", 100, 16, rate_per_s=0.0)
    with pytest.raises(Exception, match="--requests"):
        WorkloadSpec("chat", 100, 16, num_requests=0)


# ---- cost model ------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["llama-3.1-8b", "gemma-3-27b", "qwen3-next-80b-a3b", "llama-4-scout",
                                   "deepseek-v3", "issue-15401"])
def test_live_kv_bytes_is_ideal_bytes_per_request(model: str) -> None:
    layout = load_model(model)
    lengths = np.asarray([1, 7, 128, 129, 1000, 8191, 8192, 8193, 100000], np.int64)
    got = LiveKvBytes(layout)(lengths)
    assert got.tolist() == [float(ideal_bytes_per_request(layout, int(n))) for n in lengths]


def test_cost_model_roofline() -> None:
    layout = load_model("llama-3.1-8b")
    cost = CostModel(layout, GPUS["h100"], 8e9, overhead_s=0.0)
    one = cost.step(np.asarray([1001]), np.asarray([1000]))
    kv = 1001 * layout.kv_bytes_per_token() + layout.kv_bytes_per_token()
    assert one.bytes == pytest.approx(16e9 + kv)
    assert one.seconds == pytest.approx(one.bytes / (3.35e12 * 0.8))  # a decode is memory bound
    big = cost.step(np.asarray([8192]), np.asarray([0]))
    assert big.seconds == pytest.approx(big.flops / (990e12 * 0.6))  # a long prefill is compute bound
    assert big.flops > 2 * 8e9 * 8192
    h200 = CostModel(layout, GPUS["h200"], 8e9, overhead_s=0.0).step(np.asarray([1001]), np.asarray([1000]))
    assert h200.seconds == pytest.approx(one.seconds * 3.35 / 4.8)
    assert cost.step(np.asarray([5]), np.asarray([5])).seconds == 0.0  # nothing ran
    with pytest.raises(Exception, match="active-params"):
        CostModel(layout, GPUS["h100"], 0.0)


# ---- the baseline planner and the issue-15401 scenario ------------------------------------
def test_single_request_plan_is_the_production_formula() -> None:
    spec = dataclasses.replace(issue_spec(), pools="per-lifecycle")  # the static pools it compares with
    base, good = single_request_plan(spec), plan(spec)
    grouped = group_layers(spec.layout, ISSUE_TPB)
    assert demand(grouped, [ISSUE_LEN], [ISSUE_LEN - 1]) == (1, 539, 1)
    assert tuple(pg.min_slots for pg in base.pool_groups) == (1, 539, 1)
    assert base.slots == (1, 748, 1)  # the windowed groups sit at their floor
    assert base.gpu_bytes_used <= spec.gpu_bytes
    assert tuple(f.min_slots for f in compute_floors(spec, grouped)) == (128, 539, 128)
    assert all(n >= f for n, f in zip(good.slots, (128, 539, 128), strict=True))


def test_issue_15401_guaranteed_planner_completes_everything() -> None:
    spec = issue_spec()
    wl = make_workload(WorkloadSpec("issue-15401", ISSUE_LEN, ISSUE_TPB, num_requests=6, seed=1))
    r = simulate(spec, wl, cost_for(spec.layout, 37e9), SimConfig(check=True, check_every=7))
    assert not r.deadlocked and r.deadlock_reason == ""
    assert (r.requests, r.completed, r.rejected) == (6, 6, 0)
    assert r.output_tokens == sum(s.turns[0].max_new_tokens for s in wl.sessions)
    # the full group binds, not a window; admission holds back prompts that would not fit
    # beside the running ones (it reached 0.9 when requests were admitted on a first chunk
    # and preempted later), so the peak sits just below
    peaks = r.peak_utilization_per_pool_group
    assert peaks[1] > 0.85 and peaks[1] == max(peaks)


def test_issue_15401_single_request_planner_deadlocks() -> None:
    spec = issue_spec()
    wl = make_workload(WorkloadSpec("issue-15401", ISSUE_LEN, ISSUE_TPB, num_requests=6, seed=1))
    r = simulate(spec, wl, cost_for(spec.layout, 37e9), SimConfig(planner="single-request", check=True))
    assert r.deadlocked
    assert r.slots_per_pool_group[0] == r.slots_per_pool_group[2] == 1
    assert "cannot take one token" in r.deadlock_reason and "history 256" in r.deadlock_reason
    assert r.completed == 0
    # its admission check trusts the same formula: requests whose last position straddles a
    # block boundary are refused outright; the others are admitted and then cannot advance
    assert all("needs 2 slots even alone" in why for why in r.rejected_reasons)


# ---- policies and results ----------------------------------------------------------------
def chat_spec(host_bytes: int) -> PlanSpec:
    return PlanSpec(load_model("llama-3.1-8b"), gpu_bytes=2 * GIB, max_seq_len=8192, tokens_per_block=16,
                    max_batch_size=64, host_bytes=host_bytes)


def test_no_evict_never_preempts_and_max_utilization_is_faster_on_chat() -> None:
    """With a host tier (victims are suspended, not recomputed) max-utilization's higher
    concurrency wins. Without one it loses: see test_preempted_request_is_not_readmitted_to_thrash."""
    spec = chat_spec(16 * GIB)
    wl = make_workload(WorkloadSpec("chat", 8192, 16, num_requests=150, seed=0))
    cost = cost_for(spec.layout)
    no_evict = simulate(spec, wl, cost, SimConfig(policy="no-evict"))
    max_util = simulate(spec, wl, cost, SimConfig(policy="max-utilization"))
    assert no_evict.preemptions == no_evict.suspensions == 0
    assert max_util.suspensions > 0
    assert no_evict.completed == max_util.completed == 150
    assert max_util.output_tokens == no_evict.output_tokens
    assert max_util.output_tokens_per_s > no_evict.output_tokens_per_s


def test_never_fit_requests_are_rejected_with_a_reason() -> None:
    spec = chat_spec(0)
    sessions = (Session(0.0, (Turn(9000, 10),)), Session(0.0, (Turn(100, 5),)))
    wl = Workload(WorkloadSpec("chat", 8192, 16), sessions)
    r = simulate(spec, wl, cost_for(spec.layout))
    assert (r.requests, r.completed, r.rejected) == (2, 1, 1)
    assert r.rejected_reasons == ("request 0 (9000 + 10 tokens): needs 9009 tokens > max_seq_len 8192",)
    assert not r.deadlocked


def test_multi_turn_turns_arrive_after_the_previous_turn() -> None:
    spec = chat_spec(0)
    wl = make_workload(WorkloadSpec("multi-turn", 8192, 16, num_requests=30, seed=2))
    sim = Simulator(spec, wl, cost_for(spec.layout))
    r = sim.run()
    assert r.completed == 30
    by_session: dict[int, list[Any]] = {}
    for t in sim._tracked:
        by_session.setdefault(sim._session_of[t.spec.request_id][0], []).append(t)
    for si, tracked in by_session.items():
        for i, (prev, t) in enumerate(itertools.pairwise(tracked)):
            think = wl.sessions[si].turns[i + 1].think_s
            assert t.spec.arrival_s == pytest.approx(prev.finish_s + think)


def test_rate_progress_and_occupancy() -> None:
    spec = chat_spec(0)
    wl = make_workload(WorkloadSpec("chat", 8192, 16, num_requests=40, seed=4, rate_per_s=2.0))
    seen: list[SimProgress] = []
    r = simulate(spec, wl, cost_for(spec.layout), SimConfig(occupancy_points=50), seen.append)
    assert r.completed == 40 and r.sim_seconds >= wl.sessions[-1].arrival_s
    assert seen and all(p.steps % 64 == 0 for p in seen)
    occ = r.occupancy
    assert 0 < len(occ.time_s) <= 50 and len(occ.utilization) == 1 and len(occ.running) == len(occ.time_s)
    assert max(occ.utilization[0]) == r.peak_utilization_per_pool_group[0]
    assert list(occ.time_s) == sorted(occ.time_s)
    assert r.ttft_p50_ms is not None and r.ttft_p50_ms <= (r.ttft_p90_ms or 0) <= (r.ttft_p99_ms or 0)
    assert r.bookkeeping_us_per_step_p50 is not None and r.steps_per_wall_second > 0


# ---- CLI ------------------------------------------------------------------------------------
ISSUE_ARGS = ["simulate", "issue-15401", "--gpu-mem", str(ISSUE_GPU_BYTES), "--workload", "issue-15401",
              "--max-batch-size", "64", "--tokens-per-block", "256", "--max-seq-len", "137984"]
JSON_KEYS = {"requests", "completed", "rejected", "deadlocked", "steps", "preemptions", "suspensions",
             "output_tokens_per_s", "ttft_p50_ms", "tpot_p50_ms", "peak_utilization_per_pool_group"}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "simulate", "llama-3.1-8b", "--gpu-mem", "4GiB", "--workload", "chat",
                             "--requests", "20", "--max-seq-len", "4096", "--json")
    assert code == 0 and err == ""
    j = json.loads(out)
    assert set(j) >= JSON_KEYS
    assert j["requests"] == j["completed"] == 20 and j["deadlocked"] is False
    assert j["active_params"] == BY_NAME["llama-3.1-8b"].active_params


def test_cli_single_request_deadlock(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, *ISSUE_ARGS, "--planner", "single-request", "--requests", "8", "--json")
    assert code == 0
    j = json.loads(out)
    assert j["deadlocked"] is True and j["slots_per_pool_group"] == [1, 748, 1]


def test_cli_table_and_file_layout_note(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "layout.json"
    path.write_text(json.dumps({"name": "tiny", "layers": [
        {"type": "attention", "window": None, "kv_bytes_per_token": 4096, "count": 4}]}))
    code, out, _ = run_cli(capsys, "simulate", str(path), "--gpu-mem", "1GiB", "--workload", "chat",
                           "--requests", "5", "--max-seq-len", "2048")
    assert code == 0
    assert "deadlocked               no" in out and "5 completed" in out
    assert "active_params 8e+09 assumed for a model file" in out
    code, out, _ = run_cli(capsys, "simulate", str(path), "--gpu-mem", "1GiB", "--workload", "chat",
                           "--requests", "5", "--max-seq-len", "2048", "--active-params", "1.5B", "--json")
    assert json.loads(out)["active_params"] == 1.5e9 and json.loads(out)["notes"] == []


@pytest.mark.parametrize(("extra", "message"), [
    (["--gpu-mem", "1GiB", "--pools", "per-lifecycle"], "Raise --gpu-mem to at least 3748659200 B"),
    (["--rate", "-1"], "--rate must be > 0"),
    (["--active-params", "lots"], "--active-params: cannot read 'lots'"),
    (["--requests", "0"], "--requests must be >= 1"),
])
def test_cli_user_errors(capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    code, out, err = run_cli(capsys, *ISSUE_ARGS, *extra)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_plot_without_matplotlib(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name))
    code, _, err = run_cli(capsys, *ISSUE_ARGS, "--plot", "x.png")
    assert code == 2 and "pip install matplotlib" in err and len(err.strip().splitlines()) == 1


def test_cli_plot_writes_a_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "occ.png"
    code, out, _ = run_cli(capsys, "simulate", "gpt-oss-20b", "--gpu-mem", "2GiB", "--workload", "chat",
                           "--requests", "30", "--max-seq-len", "8192", "--plot", str(png))
    assert code == 0 and f"occupancy plot written to {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- property: the guaranteed planner never deadlocks ------------------------------------
@st.composite
def small_layouts(draw: st.DrawFn, tpb: int) -> ModelLayout:
    def layer() -> LayerSpec:
        kind = draw(st.sampled_from(["full", "window", "window+sinks", "chunked", "ssm"]))
        heads = draw(st.integers(1, 2))
        if kind == "ssm":
            return ssm_layer(draw(st.integers(1, 64)), draw(st.integers(1, 64)), 2, 2)
        if kind == "full":
            return attention_layer(heads, 8, 2, Full())
        if kind == "chunked":
            return attention_layer(heads, 8, 2, Chunked(draw(st.integers(1, 3 * tpb))))
        window = draw(st.integers(1, 3 * tpb))  # smaller and larger than a block
        sinks = draw(st.integers(1, tpb + 2)) if kind == "window+sinks" else 0
        return attention_layer(heads, 8, 2, Sliding(window, sinks))

    return ModelLayout("random", tuple(layer() for _ in range(draw(st.integers(1, 4)))))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[PlanSpec, WorkloadSpec, SimConfig]:
    tpb = draw(st.sampled_from([2, 4, 8, 16]))
    layout = draw(small_layouts(tpb))
    max_seq_len = draw(st.integers(max(2, tpb), 160))
    batch = draw(st.integers(1, 6))
    pools = draw(st.sampled_from(POOL_MODES))  # liveness rests on floor (a) alone: both modes
    probe = PlanSpec(layout, gpu_bytes=1, max_seq_len=max_seq_len, tokens_per_block=tpb, max_batch_size=batch,
                     pools=pools)
    grouped = group_layers(layout, tpb, pools)
    floor_bytes = sum(f.min_slots * pg.slot_bytes
                      for f, pg in zip(compute_floors(probe, grouped), grouped.pool_groups, strict=True))
    extra = draw(st.sampled_from([0, 0, 1, 10, 50])) * floor_bytes // 100  # at and just above the floors
    host = draw(st.sampled_from([0, 0, floor_bytes]))
    spec = PlanSpec(layout, gpu_bytes=floor_bytes + extra, max_seq_len=max_seq_len, tokens_per_block=tpb,
                    max_batch_size=batch, host_bytes=host, pools=pools)
    rate = draw(st.sampled_from([None, 50.0]))
    wl = WorkloadSpec(draw(st.sampled_from(list(WORKLOADS))), max_seq_len, tpb,
                      num_requests=draw(st.integers(1, 10)), seed=draw(st.integers(0, 2**16)), rate_per_s=rate)
    policy = draw(st.sampled_from(["max-utilization", "no-evict"]))
    chunk = draw(st.sampled_from([1, 3, tpb, 2048]))
    config = SimConfig(policy=policy, check=True,
                       token_budget=max(batch, draw(st.sampled_from([batch, 16, 8192]))), prefill_chunk_tokens=chunk,
                       prefix_caching=draw(st.booleans()))  # liveness must hold with cached pages too
    return spec, wl, config


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_guaranteed_planner_never_deadlocks(scenario: tuple[PlanSpec, WorkloadSpec, SimConfig]) -> None:
    spec, wl_spec, config = scenario
    wl = make_workload(wl_spec)
    r = simulate(spec, wl, cost_for(spec.layout), config)  # check=True: liveness + invariants every step
    assert not r.deadlocked, r.deadlock_reason
    assert r.rejected == 0  # every request fits max_seq_len, and the plan holds one alone
    assert r.completed == r.requests == wl.num_requests
    assert r.output_tokens == sum(t.max_new_tokens for s in wl.sessions for t in s.turns)


# ---- scheduler regressions (found by the simulator) ----
def test_preempted_request_is_not_readmitted_to_thrash() -> None:
    """One full-attention pool of 20 slots (tpb 4). A (40 + 24 tokens) and B (40 + 4) prefill
    together and fill it; when A's decode needs a block, B (latest) is preempted (no host
    tier: its KV is dropped). In the same schedule() call B is re-admitted with a fresh 8-token
    chunk into the slots it just freed, although its 41-token prefill target (11 blocks) can
    never fit beside A (10..16 blocks) until A finishes: next step it is preempted again.
    B is preempted 9 times while A alone keeps running; every re-prefill is wasted compute
    (the simulator charges it: on chat without a host tier max-utilization then has lower
    throughput than no-evict)."""
    layout = ModelLayout("one-full", (attention_layer(1, 8, 2, Full()),))
    pool = plan(PlanSpec(layout, gpu_bytes=20 * 128, max_seq_len=64, tokens_per_block=4, max_batch_size=2))
    assert pool.slots == (20,)
    m = KVCacheManager(pool, ManagerConfig(max_active_requests=2, storage=StorageConfig(with_data=False)))
    s = Scheduler(m, SchedulerConfig(max_batch_size=2, token_budget=64, prefill_chunk_tokens=8))
    a, b = s.submit(SeqRequest(0, 40, 24)), s.submit(SeqRequest(1, 40, 4))
    for step in range(100):
        step_plan = s.schedule()
        s.complete(step_plan, float(step))
        if a.status is Status.FINISHED and b.status is Status.FINISHED:
            break
    assert a.status is Status.FINISHED and b.status is Status.FINISHED
    assert b.preemptions <= 1, f"B was preempted {b.preemptions} times while A kept running"


def test_no_evict_admits_what_passed_submission() -> None:
    """One window-4 layer, tpb 4, planned at its floor: 2 slots (a decode's window straddles
    two blocks). A 16 + 4 token request passes the submission check (its peak one token at a
    time is 2 slots). NoEvict.admits reserves lifetime_peak_demand(..., prefill_chunk_tokens=8):
    a chunk [8, 16) with the window reaching back to token 5 spans 3 blocks > 2 slots, so it
    refuses, with nothing running, forever: every StepPlan is empty and not ``deadlocked``.
    (The running-set path would shrink the chunk to fit; admission does not.) Seen in the
    simulator at real sizes: ``hybridkv simulate issue-15401 --gpu-mem 685015040
    --max-batch-size 4 --max-seq-len 32k --tokens-per-block 16 --workload long-context
    --policy no-evict`` stalls at step 0 with every slot free."""
    layout = ModelLayout("one-window", (attention_layer(1, 8, 2, Sliding(4)),))
    pool = plan(PlanSpec(layout, gpu_bytes=2 * 128, max_seq_len=32, tokens_per_block=4, max_batch_size=1))
    assert pool.slots == (2,)
    m = KVCacheManager(pool, ManagerConfig(max_active_requests=1, storage=StorageConfig(with_data=False)))
    s = Scheduler(m, SchedulerConfig(max_batch_size=1, token_budget=64, prefill_chunk_tokens=8, policy="no-evict"))
    t = s.submit(SeqRequest(0, 16, 4))
    assert t.reason == ""  # it passed the submission check (status waiting)
    for step in range(50):
        step_plan = s.schedule()
        assert step_plan.advanced or step_plan.deadlocked, f"step {step}: nothing advanced, no deadlock reported"
        s.complete(step_plan, float(step))
        if t.status is Status.FINISHED:
            break
    assert t.status is Status.FINISHED


def test_multi_turn_reuses_resent_tokens_with_the_prefix_cache() -> None:
    """Each turn resends the conversation: with the prefix cache and room to spare, nearly every
    resent token is served from the cache (block-aligned, one token always computed); without
    it none is. Liveness and manager invariants are checked every step."""
    layout = load_model("gpt-oss-20b")
    spec = PlanSpec(layout, gpu_bytes=2 * GIB, max_seq_len=8192, max_batch_size=8)
    wl = make_workload(WorkloadSpec("multi-turn", spec.max_seq_len, spec.tokens_per_block, 40, seed=3))
    cost = cost_for(layout)
    plain = simulate(spec, wl, cost, SimConfig())
    cached = simulate(spec, wl, cost, SimConfig(prefix_caching=True, check=True, check_every=5))
    assert plain.reused_tokens == 0 and plain.completed == cached.completed == wl.num_requests
    assert cached.resent_tokens == plain.resent_tokens > 0
    assert cached.resent_reuse_rate >= 0.9
    assert cached.reused_tokens % spec.tokens_per_block == 0
    assert cached.output_tokens == plain.output_tokens
