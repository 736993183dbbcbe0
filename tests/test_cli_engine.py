"""``hybridkv generate`` and ``hybridkv serve-bench`` over the reference engine (CPU, tiny random
models): generate's tokens are the engine's and transformers' own greedy tokens, printed one
line per step as they come; serve-bench's counts are exact; bad input is one error line."""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
torch.set_num_threads(1)

from cli_run import check  # noqa: E402
from hybridkv.runtime import Engine, EngineConfig, build_model  # noqa: E402
from hybridkv.runtime import engine as engine_module  # noqa: E402

PROMPT = [1, 2, 3, 4, 5, 6, 7]
NEW = 8


def engine_tokens(prompt: list[int], seed: int = 0) -> list[int]:
    engine = Engine(build_model("gemma3_text", seed=seed), EngineConfig(max_batch_size=1))
    return engine.generate([prompt], max_new_tokens=NEW)[0]


def transformers_tokens(prompt: list[int], seed: int = 0) -> list[int]:
    model = build_model("gemma3_text", seed=seed)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False)
    return [int(t) for t in out[0, len(prompt):]]


class StepClock:
    """Counts engine steps, so each printed line can be dated by the step it came in."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps = 0
        step = engine_module.Engine.step

        def counted(engine: Any) -> Any:
            self.steps += 1
            return step(engine)

        monkeypatch.setattr(engine_module.Engine, "step", counted)


class DatedWriter:
    """A stdout that records the step count at every line written."""

    def __init__(self, clock: StepClock) -> None:
        self.clock, self.partial = clock, ""
        self.lines: list[tuple[int, str]] = []

    def write(self, text: str) -> int:
        self.partial += text
        while "\n" in self.partial:
            line, self.partial = self.partial.split("\n", 1)
            self.lines.append((self.clock.steps, line))
        return len(text)

    def flush(self) -> None:
        pass


def test_generate_streams_the_engine_and_transformers_greedy_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = StepClock(monkeypatch)
    writer = DatedWriter(clock)
    monkeypatch.setattr(sys, "stdout", writer)
    from hybridkv.cli.main import main

    code = main(["generate", "gemma3_text", "--prompt", " ".join(map(str, PROMPT)),
                 "--max-new-tokens", str(NEW), "--seed", "0"])
    monkeypatch.undo()
    assert code == 0
    tokens = [int(line) for _, line in writer.lines]
    assert tokens == engine_tokens(PROMPT) == transformers_tokens(PROMPT)
    # one line per token, each printed right after the step that made it (one request, no
    # chunking at 7 tokens: step k makes token k)
    assert [steps for steps, _ in writer.lines] == list(range(1, NEW + 1))


def test_generate_text_prompt_is_bytes_modulo_the_vocabulary() -> None:
    r = check(["generate", "gemma3_text", "--prompt", "hi", "--max-new-tokens", str(NEW), "--seed", "2", "--json"])
    j = json.loads(r.out)
    assert j["prompt_ids"] == [ord("h"), ord("i")]  # vocab_size 256: the bytes themselves
    assert j["output_ids"] == engine_tokens([104, 105], seed=2) and j["text"] is None


def test_generate_sampling_is_seeded() -> None:
    argv = ["generate", "gemma3_text", "--prompt", "5,6,7", "--max-new-tokens", "6", "--temperature", "0.9",
            "--seed", "4", "--json", "--pools", "per-lifecycle"]
    first, again = json.loads(check(argv).out), json.loads(check(argv).out)
    assert first["output_ids"] == again["output_ids"]
    engine = Engine(build_model("gemma3_text", seed=4), EngineConfig(max_batch_size=1, pools="per-lifecycle"))
    assert first["output_ids"] == engine.generate([[5, 6, 7]], 6, temperature=0.9, seed=4)[0]


def test_generate_from_a_directory_streams_decoded_text(tmp_path: Any) -> None:
    """A saved model with a tokenizer: the prompt is text, the output decoded text, and the
    tokenizer's end-of-sequence token stops the request."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(254)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece()  # words joined by spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(tmp_path)
    build_model("gemma3_text", seed=5).save_pretrained(tmp_path)
    r = check(["generate", str(tmp_path), "--prompt", "w1 w2 w3", "--max-new-tokens", str(NEW)])
    engine = Engine(build_model("gemma3_text", seed=5), EngineConfig(max_batch_size=1))
    want = engine.generate([[3, 4, 5]], max_new_tokens=NEW, stop_token_ids=[0])[0]
    assert r.out == fast.decode(want, skip_special_tokens=True) + "\n"
    j = json.loads(check(["generate", str(tmp_path), "--prompt", "w1 w2 w3", "--max-new-tokens", str(NEW),
                          "--json"]).out)
    assert j["prompt_ids"] == [3, 4, 5] and j["output_ids"] == want


def test_generate_from_a_config_file_is_the_same_model(tmp_path: Any) -> None:
    from hybridkv.runtime import tiny_config

    path = tmp_path / "config.json"
    path.write_text(tiny_config("gemma3_text").to_json_string(), encoding="utf-8")
    r = check(["generate", str(path), "--prompt", "1 2 3 4 5 6 7", "--max-new-tokens", str(NEW), "--json"])
    assert json.loads(r.out)["output_ids"] == engine_tokens(PROMPT)


SERVE_KEYS = {"model", "device", "pools", "max_batch_size", "seed", "prompt_len", "output_len", "shared_prefix",
              "requests",
              "completed", "prompt_tokens", "output_tokens", "steps", "elapsed_s", "output_tokens_per_s",
              "total_tokens_per_s", "ttft_s", "tpot_s", "preemptions", "suspensions", "prefix_cache",
              "reused_tokens", "prefix_hit_rate"}


@pytest.mark.parametrize("progress", [False, True])
def test_serve_bench_json_counts(progress: bool) -> None:
    argv = ["serve-bench", "gemma3_text", "--requests", "6", "--prompt-len", "4-40", "--output-len", "1-9",
            "--max-batch-size", "3", "--seed", "3", "--json"]
    r = check(argv) if not progress else _run_with_progress([*argv, "--progress"])
    j = json.loads(r.out)
    assert set(j) == SERVE_KEYS
    rng = np.random.default_rng(3)  # the command's draws: prompt lengths, then output lengths
    prompts, outputs = rng.integers(4, 41, 6), rng.integers(1, 10, 6)
    assert j["requests"] == j["completed"] == 6
    assert j["prompt_tokens"] == int(prompts.sum()) and j["output_tokens"] == int(outputs.sum())
    assert set(j["ttft_s"]) == {"p50", "p90", "p99"} and j["ttft_s"]["p50"] <= j["ttft_s"]["p99"]
    assert (j["tpot_s"] is None) == bool((outputs == 1).all())
    assert j["prefix_cache"] is True and 0.0 <= j["prefix_hit_rate"] <= 1.0
    assert j["steps"] >= int(outputs.max()) and j["preemptions"] >= 0
    if progress:
        assert "serve-bench [" in r.err and "6/6 requests" in r.err


def _run_with_progress(argv: list[str]) -> Any:
    from cli_run import invoke

    r = invoke(argv)
    assert r.code == 0 and "Traceback" not in r.err
    return r


def test_serve_bench_report_and_no_prefix_cache() -> None:
    r = check(["serve-bench", "gemma3_text", "--requests", "2", "--prompt-len", "8", "--output-len", "2-3",
               "--no-prefix-cache"])
    assert r.out.startswith("model gemma3_text on cpu (shared pools, max batch 8): 2/2 requests, 16 prompt")
    assert "prefix-cache hit rate off" in r.out and "TTFT: p50" in r.out


def test_serve_bench_shared_prefix_is_reused() -> None:
    """One request at a time: each after the first reuses the 48 shared tokens (3 blocks)."""
    r = check(["serve-bench", "gemma3_text", "--requests", "4", "--shared-prefix", "48", "--prompt-len", "4-20",
               "--output-len", "2", "--max-batch-size", "1", "--json"])
    j = json.loads(r.out)
    own = int(np.random.default_rng(0).integers(4, 21, 4).sum())
    assert j["prompt_tokens"] == 4 * 48 + own and j["output_tokens"] == 8
    assert j["reused_tokens"] == 3 * 48 and j["prefix_hit_rate"] == round(3 * 48 / j["prompt_tokens"], 4)


@pytest.mark.parametrize(("argv", "needle"), [
    (["generate", "no_such_model", "--prompt", "1"], "MODEL 'no_such_model': not a transformers model_type"),
    (["generate", "t5", "--prompt", "1"], "MODEL 't5': transformers cannot build it (ValueError: Unrecognized"),
    (["generate", "bert", "--prompt", "1"], "MODEL 'bert': the reference engine cannot run it (RuntimeError: "),
    (["generate", "gemma3_text", "--prompt", "1 2 999"], "--prompt: token id 999 is outside the vocabulary"),
    (["generate", "gemma3_text", "--prompt", "1", "--temperature", "nan"], "--temperature must be >= 0"),
    (["generate", "gemma3_text", "--prompt", "1 2", "--max-new-tokens", "1024"],
     "--prompt + --max-new-tokens: requests of up to 1025 tokens exceed the model's max_position_embeddings"),
    (["generate", "gemma3_text", "--prompt", "1", "--gpu-mem", "1KiB"], "Raise --gpu-mem"),
    (["generate", "gemma3_text", "--prompt", "1", "--seed", "-1"], "--seed must be in [0, 2^64 - 1]"),
    (["serve-bench", "gemma3_text", "--requests", "0"], "--requests must be >= 1, got 0"),
    (["serve-bench", "gemma3_text", "--requests", "2", "--prompt-len", "9-3"],
     "--prompt-len: cannot read range '9-3'; write A-B with 1 <= A <= B"),
    (["serve-bench", "gemma3_text", "--requests", "2", "--output-len", "x"], "--output-len: cannot read range"),
    (["serve-bench", "gemma3_text", "--requests", "2", "--max-batch-size", "0"], "--max-batch-size must be >= 1"),
    (["serve-bench", "/no/such/config.json", "--requests", "2"], "cannot read the config file"),
    (["serve-bench", "gemma3_text", "--requests", "2", "--shared-prefix", "1000"],
     "--shared-prefix + --prompt-len + --output-len: requests of up to 1095 tokens exceed"),
])
def test_bad_input_is_one_line_naming_the_flag(argv: list[str], needle: str) -> None:
    r = check(argv)
    assert r.code == 2 and needle in r.err, r.err


def test_missing_engine_extra_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    r = check(["generate", "gemma3_text", "--prompt", "1"])
    assert r.code == 2 and "pip install 'hybridkv[engine]'" in r.err
