"""The console entry point on generated input: exit 2 with one error line, or exit 0 with
finite numbers; never a traceback, never a hang (hypothesis' deadline flags slow calls; the
watchdog in cli_run fails a call that never returns).

Generated: sizes, token counts and constraint specs (huge digits, decimals, units, garbage,
negatives), layout JSON documents (valid and mutated: wrong types, huge counts and windows,
missing fields, deep nesting), Hugging Face configs from tests/test_hf_config.py with one
field mutated, and ``simulate`` / ``bench step`` options. The issue's own examples are in
test_cli_bad_input.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_hf_config as hf
from cli_run import check
from hybridkv.cli.bench import MAX_BATCH, MAX_REPEATS, MAX_REQUEST_STEPS, MAX_STEPS

FUZZ = settings(max_examples=200, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
HF_CONFIGS = [hf.GEMMA3_27B, hf.GEMMA2_27B, hf.GPT_OSS_20B, hf.LLAMA4_SCOUT, hf.QWEN3_NEXT, hf.JAMBA,
              hf.DEEPSEEK_V3, hf.NEMOTRON_H, hf.QWEN2_5_7B, hf.PHI3_5_MINI]


# ---- generated text specs --------------------------------------------------------------------
HUGE = st.integers(1, 600).map(lambda n: "9" * n)
NUMBER = st.one_of(st.integers(0, 2**41).map(str), st.integers(-10, 10**25).map(str), HUGE,
                   st.decimals(0, 10**20, allow_nan=False, allow_infinity=False, places=3).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))
UNIT = st.sampled_from(["", "B", "K", "KiB", "kb", "M", "MiB", "MB", "G", "GiB", " GB", "T", "TiB", "TB", "EiB", "x"])
SIZE = st.one_of(
    st.tuples(st.integers(1, 4096).map(str), UNIT).map("".join),
    st.tuples(NUMBER, UNIT).map("".join),
    st.text(max_size=12))
TOKENS = st.one_of(st.integers(0, 2**41).map(str), st.integers(0, 2**21).map(lambda n: f"{n}k"),
                   st.tuples(NUMBER, st.sampled_from(["", "k", "m", "K", "t"])).map("".join), st.text(max_size=8))
ITEM = st.tuples(st.one_of(st.integers(0, 64).map(str), st.integers(0, 10**12).map(str), HUGE), TOKENS,
                 st.one_of(st.just(""), TOKENS.map(lambda t: "@" + t))).map(lambda p: f"{p[0]}x{p[1]}{p[2]}")
BATCH_SPEC = st.tuples(st.lists(ITEM, min_size=1, max_size=3).map("+".join),
                       st.one_of(st.just(""), TOKENS.map(lambda t: ",prefix=" + t))).map("".join)
CONSTRAINT = st.one_of(BATCH_SPEC, BATCH_SPEC, st.text(max_size=16))
INT_OPTION = st.one_of(st.integers(-3, 2**21).map(str), HUGE, st.text(max_size=6))


@FUZZ
@given(gpu=SIZE, host=st.one_of(st.none(), SIZE), seq=st.one_of(st.none(), TOKENS))
def test_plan_sizes(gpu: str, host: str | None, seq: str | None) -> None:
    argv = ["plan", "gemma-3-27b", f"--gpu-mem={gpu}", "--json"]
    argv += [f"--host-mem={host}"] if host is not None else []
    argv += [f"--max-seq-len={seq}"] if seq is not None else []
    check(argv)


@FUZZ
@given(constraints=st.lists(CONSTRAINT, min_size=1, max_size=3), typical=st.one_of(st.none(), CONSTRAINT),
       batch=INT_OPTION, tpb=st.one_of(st.just("16"), INT_OPTION))
def test_plan_batches_and_int_options(constraints: list[str], typical: str | None, batch: str, tpb: str) -> None:
    argv = ["plan", "llama-4-scout", "--gpu-mem", "1TiB", "--max-seq-len", "64k", "--json",
            f"--max-batch-size={batch}", f"--tokens-per-block={tpb}"]
    argv += [f"--constraint={c}" for c in constraints]
    argv += [f"--typical={typical}"] if typical is not None else []
    check(argv)


# ---- generated model files --------------------------------------------------------------------
BIG = st.sampled_from([2**16, 2**16 + 1, 10**12, 2**40, 2**40 + 1, 2**60 + 1, 10**30, 10**400])
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2, 300), BIG,
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=4), inner, max_size=2)),
                     max_leaves=6)
GOOD_FIELD = {"window": st.one_of(st.none(), st.integers(1, 5000)), "sink_tokens": st.integers(0, 8),
              "chunk": st.integers(1, 5000), "kv_bytes_per_token": st.integers(1, 9000),
              "count": st.integers(1, 40), "state_bytes": st.integers(1, 10**6)}


@st.composite
def layer_entry(draw: st.DrawFn, mutate: bool) -> dict[str, Any]:
    kind = draw(st.sampled_from(["attention", "ssm"]))
    keys = ["window", "sink_tokens", "kv_bytes_per_token", "count"] if kind == "attention" else \
        ["state_bytes", "count"]
    entry: dict[str, Any] = {"type": kind}
    for key in keys:
        if draw(st.integers(0, 9)):  # mostly present and valid
            entry[key] = draw(GOOD_FIELD[key])
    if mutate:  # a wrong or huge value, a field of the other kind, an unknown one
        key = draw(st.sampled_from([*GOOD_FIELD, "type", "extra"]))
        entry[key] = draw(st.one_of(VALUE, BIG))
    return entry


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def layout_text(draw: st.DrawFn) -> str:
    """A valid layout with at most one mutation."""
    mutation = draw(st.sampled_from(["none", "none", "layer", "layer", "layer", "name", "layers", "max_pos",
                                     "nesting"]))
    layers = draw(st.lists(st.booleans(), min_size=1, max_size=4))  # which entry gets the mutation
    doc: dict[str, Any] = {
        "name": draw(VALUE) if mutation == "name" else "m",
        "layers": draw(VALUE) if mutation == "layers" else
        [draw(layer_entry(mutate=mutation == "layer" and i == 0)) for i, _ in enumerate(layers)]}
    if mutation == "max_pos" or draw(st.booleans()):
        doc["max_position_embeddings"] = draw(st.one_of(VALUE, BIG)) if mutation == "max_pos" else \
            draw(st.integers(1, 10**6))
    text = json.dumps(doc)
    if mutation == "nesting":  # a deep list in front of the first layer
        text = text.replace('"layers": [', f'"layers": [{nested(draw(st.integers(1, 20_000)))}, ', 1)
    return text


@st.composite
def hf_config(draw: st.DrawFn) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads(json.dumps(draw(st.sampled_from(HF_CONFIGS))))
    target = cfg["text_config"] if "text_config" in cfg and draw(st.booleans()) else cfg
    n = target.get("num_hidden_layers", 4)
    mutation = draw(st.sampled_from(["value", "value", "delete", "per-layer"]))
    if mutation == "per-layer":  # lists of lists, of mixed int / str, of the wrong length
        key = draw(st.sampled_from(["layer_types", "no_rope_layers", "hybrid_override_pattern"]))
        item = st.one_of(st.sampled_from(["full_attention", "sliding_attention", "mamba", "M", "*"]),
                         st.integers(0, 1), st.lists(st.text(max_size=3), max_size=2))
        size = st.sampled_from([n, n, n - 1]) if isinstance(n, int) and 0 < n <= 64 else st.integers(0, 4)
        target[key] = draw(size.flatmap(lambda k: st.lists(item, min_size=k, max_size=k)))
        return cfg
    key = draw(st.sampled_from([*sorted(target), "head_dim", "sliding_window", "layer_types", "no_rope_layers"]))
    if mutation == "delete":
        target.pop(key, None)
    else:
        target[key] = draw(st.one_of(VALUE, BIG))
    return cfg


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(text=layout_text())
def test_layout_json_documents(files: Path, text: str) -> None:
    path = files / "layout.json"
    path.write_text(text, encoding="utf-8")
    check(["plan", str(path), "--gpu-mem", "64GiB", "--json"])


@FUZZ
@given(cfg=hf_config())
def test_mutated_hf_configs(files: Path, cfg: dict[str, Any]) -> None:
    path = files / "config.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    check(["plan", str(path), "--gpu-mem", "1TiB", "--max-seq-len", "8k", "--json"])


# ---- simulate and bench options ---------------------------------------------------------------
FLOAT_TEXT = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                       st.sampled_from(["1e400", "-1", "0", "1e-320", "nan", "inf", "8B", "3.6B", "1e9"]), HUGE)


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.one_of(st.integers(-2**70, 2**70).map(str), HUGE), rate=st.one_of(st.none(), FLOAT_TEXT),
       params=st.one_of(st.none(), FLOAT_TEXT),
       # past MAX_REQUESTS (2^20) only: a valid 9999 really simulates 9999 requests (~30 s)
       requests=st.one_of(st.integers(-1, 3).map(str), st.integers(7, 600).map(lambda n: "9" * n)),
       extra=st.sampled_from([[], ["--max-batch-size", "1000000"], ["--max-seq-len", "1099511627776"],
                              ["--gpu-mem", "1048576TiB"], ["--tokens-per-block", "1"]]))
def test_simulate_options(seed: str, rate: str | None, params: str | None, requests: str, extra: list[str]) -> None:
    argv = ["simulate", "gemma-3-27b", "--gpu-mem", "40GiB", "--workload", "chat", "--max-seq-len", "4k",
            f"--requests={requests}", f"--seed={seed}", "--json", *extra]
    argv += [f"--rate={rate}"] if rate is not None else []
    argv += [f"--active-params={params}"] if params is not None else []
    check(argv)


def _bench_runs(batch: list[str], steps: str, repeats: str) -> bool:
    """Whether ``bench step`` would accept these (then it runs the benchmark)."""
    try:
        b, s, r = [int(x) for x in batch], int(steps), int(repeats)
    except ValueError:
        return False
    return min(b) >= 1 and min(s, r) >= 1 and max(b) <= MAX_BATCH and s <= MAX_STEPS and r <= MAX_REPEATS \
        and max(b) * s <= MAX_REQUEST_STEPS


BENCH_INT = st.one_of(INT_OPTION, st.sampled_from(["65536", "65537", "1000", "1001", str(2**26)]))


@settings(max_examples=60, deadline=5000)
@given(batch=st.lists(BENCH_INT, min_size=1, max_size=2), steps=BENCH_INT, repeats=BENCH_INT)
def test_bench_step_options(batch: list[str], steps: str, repeats: str) -> None:
    if _bench_runs(batch, steps, repeats):
        batch, steps, repeats = ["2"], "1", "1"  # valid: the real benchmark runs, so keep it short
    check(["bench", "step", "--batch", *batch, f"--steps={steps}", f"--repeats={repeats}", "--json"])
