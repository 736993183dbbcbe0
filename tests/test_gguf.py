"""GGUF files (``runtime/gguf_file.py``): tiny seeded Gemma-3 and Gemma-2 models written the way
llama.cpp's converter writes them (ggml tensor names, norms stored as 1 + w, a SentencePiece
vocabulary ranked by score) load back through ``build_model(path)`` with the same logits, and
the engine's greedy tokens on them are transformers' own; ``hybridkv generate FILE.gguf`` reads
text through the file's tokenizer; a missing, foreign or unsupported file is a ConfigError
naming the path."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers refuses a GGUF file without it
torch.set_num_threads(1)

from cli_run import check  # noqa: E402
from hybridkv.core.errors import ConfigError  # noqa: E402
from hybridkv.runtime import Engine, EngineConfig, build_model  # noqa: E402
from hybridkv.runtime.gguf_file import load_gguf_tokenizer  # noqa: E402

# A GGUF file has no layer_types: transformers applies each family's default pattern, so the
# models are built with it (Gemma-3: five window layers, then a full one; Gemma-2 alternates).
FAMILIES = {"gemma3_text": ("gemma3", {"num_hidden_layers": 6, "layer_types": None}), "gemma2": ("gemma2", {})}
CONTROL, USER_DEFINED, NORMAL = 3, 4, 1  # llama.cpp's token types
# A SentencePiece vocabulary of 256 pieces; scores rank the merges (higher merges first)
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
MERGED = {"▁c": -1.0, "ap": -2.0, "at": -3.0, "▁cap": -100.0, "▁cat": -101.0}
PIECES = [*SPECIALS, "\n\n", "▁", *"abcdefghijklmnopqrstuvwxyz", *MERGED]
TOKENS = PIECES + [f"<unused{i}>" for i in range(256 - len(PIECES))]
TYPES = [CONTROL if t.startswith("<") else USER_DEFINED if t == "\n\n" else NORMAL for t in TOKENS]
ID = {t: i for i, t in enumerate(TOKENS)}


def seeded_model(family: str, seed: int = 0) -> Any:
    """A tiny random model whose norm weights are multiples of 1/16, so 1 + w and back is exact."""
    model = build_model(family, seed=seed, **FAMILIES[family][1])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randint(-8, 8, p.shape, generator=gen) / 16)
    return model


def write_gguf(model: Any, path: Path, vocabulary: bool = True) -> str:
    """``model`` as llama.cpp writes it: the config as metadata, a vocabulary (else the
    vocabulary size), the tensors under ggml names (gguf's table, which transformers reads
    backwards), norms as 1 + w, and no output tensor (tied to the embedding)."""
    cfg = model.config
    arch = FAMILIES[cfg.model_type][0]
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in [("context_length", cfg.max_position_embeddings), ("block_count", cfg.num_hidden_layers),
                       ("feed_forward_length", cfg.intermediate_size), ("embedding_length", cfg.hidden_size),
                       ("attention.head_count", cfg.num_attention_heads),
                       ("attention.head_count_kv", cfg.num_key_value_heads), ("attention.key_length", cfg.head_dim),
                       ("attention.value_length", cfg.head_dim), ("attention.sliding_window", cfg.sliding_window)]:
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_float32(f"{arch}.rope.freq_base", rope["rope_theta"])
    if vocabulary:
        add_vocabulary(w)
    else:
        w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        base, suffix = name.rsplit(".", 1)
        ggml = names.get_name(base)
        assert ggml is not None, name
        array = tensor.numpy().astype(np.float32)
        w.add_tensor(f"{ggml}.{suffix}", array + 1 if "norm" in ggml else array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def add_vocabulary(w: Any) -> None:
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([MERGED.get(t, 0.0) for t in TOKENS])
    w.add_token_types(TYPES)
    w.add_bos_token_id(ID["<bos>"])
    w.add_eos_token_id(ID["<eos>"])
    w.add_unk_token_id(ID["<unk>"])
    w.add_pad_token_id(ID["<pad>"])
    w.add_add_bos_token(True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_gguf_file_loads_the_same_logits(tmp_path: Path, family: str) -> None:
    original = seeded_model(family)
    loaded = build_model(write_gguf(original, tmp_path / f"{family}.gguf"))
    assert type(loaded) is type(original)
    assert loaded.config.layer_types == original.config.layer_types
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (2, 40)))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, original(ids).logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_engine_on_a_gguf_model_picks_transformers_greedy_tokens(tmp_path: Path, family: str) -> None:
    """Prompts and outputs past the 16-token window, two requests at once."""
    path = write_gguf(seeded_model(family, seed=1), tmp_path / f"{family}.gguf")
    config = EngineConfig(gpu_bytes=1 << 20, max_seq_len=128, tokens_per_block=4, max_batch_size=4,
                          token_budget=64, prefill_chunk_tokens=8)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, 21).tolist(), rng.integers(0, 256, 9).tolist()]
    outs = Engine(build_model(path), config).generate(prompts, max_new_tokens=20)
    ref = build_model(path)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt])
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                            do_sample=False)
        assert out == want[0, len(prompt):].tolist()


def test_the_tokenizer_is_the_files_bpe(tmp_path: Path) -> None:
    """Merges ranked by score (a unigram model of the same pieces would split " cap" into
    " c" + "ap", whose scores sum higher); control and user-defined pieces match whole; <bos>
    first, as the file asks."""
    tok = load_gguf_tokenizer(write_gguf(seeded_model("gemma2"), tmp_path / "t.gguf"))
    assert tok.encode("a cap") == [ID["<bos>"], ID["a"], ID["▁cap"]]
    assert tok.encode("<start_of_turn>cat\n\nb") == [ID[t] for t in ["<bos>", "<start_of_turn>", "c", "at", "\n\n",
                                                                     "b"]]
    assert tok.decode(tok.encode("a cap cat"), skip_special_tokens=True) == "a cap cat"
    assert tok.eos_token_id == ID["<eos>"] and len(tok) == len(TOKENS)  # no token past the embedding rows


def test_generate_reads_text_through_the_files_tokenizer(tmp_path: Path) -> None:
    path = write_gguf(seeded_model("gemma3_text", seed=2), tmp_path / "g3.gguf")
    j = json.loads(check(["generate", path, "--prompt", "a cap", "--max-new-tokens", "6", "--json"]).out)
    assert j["prompt_ids"] == [ID["<bos>"], ID["a"], ID["▁cap"]]
    engine = Engine(build_model(path), EngineConfig(max_batch_size=1))
    want = engine.generate([j["prompt_ids"]], max_new_tokens=6, stop_token_ids=[ID["<eos>"]])[0]
    assert j["output_ids"] == want
    assert j["text"] == load_gguf_tokenizer(path).decode(want, skip_special_tokens=True)


def test_a_gguf_file_without_a_vocabulary_takes_token_ids(tmp_path: Path) -> None:
    path = write_gguf(seeded_model("gemma2", seed=3), tmp_path / "bare.gguf", vocabulary=False)
    assert load_gguf_tokenizer(path) is None
    j = json.loads(check(["generate", path, "--prompt", "1 2 3", "--max-new-tokens", "4", "--json"]).out)
    engine = Engine(build_model(path), EngineConfig(max_batch_size=1))
    assert j["output_ids"] == engine.generate([[1, 2, 3]], max_new_tokens=4)[0] and j["text"] is None


def test_bad_files_name_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "none.gguf")
    foreign = tmp_path / "config.gguf"
    foreign.write_text("{}", encoding="utf-8")
    w = gguf.GGUFWriter(str(tmp_path / "xyzzy.gguf"), "xyzzy")
    w.add_uint32("xyzzy.block_count", 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for path, needle in [(missing, "cannot read the GGUF file"), (str(foreign), "not a GGUF file (it starts with"),
                         (str(tmp_path / "xyzzy.gguf"), "general.architecture is 'xyzzy'")]:
        with pytest.raises(ConfigError) as info:
            build_model(path)
        assert path in str(info.value) and needle in str(info.value), str(info.value)
        r = check(["generate", path, "--prompt", "1 2"])
        assert r.code == 2 and needle in r.err, r.err
    good = write_gguf(seeded_model("gemma2"), tmp_path / "good.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(ConfigError, match=r"the gguf package.*pip install 'hybridkv\[gguf\]'"):
        build_model(good)
