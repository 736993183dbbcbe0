"""GGUF files for the reference engine: the weights through transformers (quantized blocks
dequantized to float32), and the tokenizer the file carries.

transformers reads the file (``from_pretrained(directory, gguf_file=path)``) and needs the
``gguf`` and ``accelerate`` packages for it (``pip install 'hybridkv[gguf]'``). It rebuilds the
config from the file's metadata, which does not say everything a config.json does: a Gemma-3
file has no ``layer_types``, so transformers' default pattern (five window layers, then one
full) applies, as it does in llama.cpp.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Any, NamedTuple

from hybridkv.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

GGUF_INSTALL_HINT = "pip install 'hybridkv[gguf]'"
_MAGIC = b"GGUF"
_VOCABULARY = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp's token types


class GgufHeader(NamedTuple):
    """What hybridkv reads of a GGUF file before transformers loads it: the architecture, to
    name it when transformers cannot load the file, and the tokenizer model
    (``tokenizer.ggml.model``; None when the file carries no vocabulary)."""

    architecture: str
    tokenizer_model: str | None


def is_gguf_path(name: str) -> bool:
    """Whether ``name`` names a GGUF file (by its ``.gguf`` suffix, whether it exists or not)."""
    return name.lower().endswith(".gguf")


def read_gguf_header(path: str) -> GgufHeader:
    """The header of the GGUF file at ``path``; ConfigError naming the path when the file is
    missing, is not a GGUF file, or has no ``general.architecture``."""
    metadata = _metadata(path)
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str):
        raise ConfigError(f"{path}: the GGUF file has no general.architecture field (a string such as 'gemma3')")
    tokenizer = metadata.get("tokenizer.ggml.model") if "tokenizer.ggml.tokens" in metadata else None
    return GgufHeader(architecture, str(tokenizer) if tokenizer is not None else None)


def load_gguf_model(path: str) -> torch.nn.Module:
    """The causal LM in the GGUF file at ``path``, float32 on the CPU, through transformers;
    ConfigError naming the path (and the architecture transformers does not load)."""
    import torch
    from transformers import AutoModelForCausalLM

    header = read_gguf_header(path)
    for package in ("gguf", "accelerate"):  # transformers needs both to read the tensors
        _require(package, path)
    full = os.path.abspath(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(full), gguf_file=full, dtype=torch.float32)
    except ImportError as e:  # a gguf package older than transformers accepts
        raise ConfigError(f"{path}: {_first_line(e)}; install the GGUF reader with {GGUF_INSTALL_HINT}") from None
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ConfigError(f"{path}: transformers cannot load a GGUF file whose general.architecture is "
                          f"{header.architecture!r} ({type(e).__name__}: {_first_line(e)})") from None
    return model.eval()


def load_gguf_tokenizer(path: str) -> Any:
    """The tokenizer the GGUF file carries, None when it has no vocabulary.

    A Gemma file's SentencePiece vocabulary is rebuilt as the byte-fallback BPE it is, its
    merges ranked by the pieces' scores (as llama.cpp reads it): transformers 5.17 makes a
    unigram model of it, whose best split of " capital" is " c" + "ap" + "it" + "al" (the
    scores are merge ranks, not log probabilities), and adds no <bos>. Other files go
    through transformers' own converter."""
    header = read_gguf_header(path)
    if header.tokenizer_model is None:
        return None
    if header.tokenizer_model == "llama" and header.architecture.startswith("gemma"):
        from transformers.integrations.gguf import read_gguf_metadata

        metadata, _ = read_gguf_metadata(path, _VOCABULARY)
        return _gemma_tokenizer(metadata)
    from transformers import AutoTokenizer

    full = os.path.abspath(path)
    return AutoTokenizer.from_pretrained(os.path.dirname(full), gguf_file=full)


def _gemma_tokenizer(metadata: dict[str, Any]) -> Any:
    """transformers' Gemma tokenizer over the file's pieces, with the merges their scores rank
    and the file's control and user-defined pieces matched whole before the BPE runs."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}

    def named(key: str, default: str) -> str:
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if token_id is not None else default

    # transformers adds a special token the vocabulary lacks, past the model's embedding rows
    mask: dict[str, Any] = {"mask_token": "<mask>" if "<mask>" in vocab else None}
    scores = metadata.get("tokenizer.ggml.scores")  # merge ranks; without them, the ids rank the merges
    merges = generate_merges(vocab, list(zip(tokens, scores, strict=True)) if scores else None)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, bos_token=named("bos", "<bos>"),
                               eos_token=named("eos", "<eos>"), unk_token=named("unknown", "<unk>"),
                               pad_token=named("padding", "<pad>"),
                               add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
                               add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)), **mask)
    for kind, special in ((_CONTROL, True), (_USER_DEFINED, False)):
        pieces = [AddedToken(t, special=special, normalized=False) for t, k in zip(tokens, types, strict=True)
                  if k == kind]
        tokenizer.add_tokens(pieces, special_tokens=special)
    return tokenizer


def _metadata(path: str) -> dict[str, Any]:
    """The file's metadata keys (arrays as their lengths), after checking it is a GGUF file."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_MAGIC))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the GGUF file ({e.strerror})") from None
    if magic != _MAGIC:
        raise ConfigError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with {_MAGIC!r})")
    from transformers.integrations.gguf import read_gguf_metadata

    try:
        metadata, _ = read_gguf_metadata(path)
    except (ValueError, struct.error, IndexError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: a GGUF file transformers cannot read ({type(e).__name__}: "
                          f"{_first_line(e)})") from None
    return dict(metadata)


def _require(package: str, path: str) -> None:
    try:
        __import__(package)
    except ImportError:
        raise ConfigError(f"{path}: transformers reads a GGUF file with the {package} package, which is not "
                          f"installed; install it with {GGUF_INSTALL_HINT}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]
