"""``hybridkv generate``: one prompt through the reference engine, its tokens streamed as they come.

MODEL is a transformers ``model_type`` (tiny sizes, seeded random weights: ``runtime.model.
tiny_config``), a local Hugging Face directory or a ``.gguf`` file (its weights, and its
tokenizer when it has one), or a config.json path (seeded random weights at the config's own
sizes). Without a tokenizer the prompt is token ids (``"1 2 3"`` or ``"1,2,3"``) or plain text
read as its UTF-8 bytes modulo the vocabulary, and each new token id is printed on its own
line; with a tokenizer the prompt is text and the decoded text is printed as it grows.

The model and engine helpers here (``add_engine_arguments``, ``load_engine_model``,
``make_engine``) are shared with ``serve-bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

from hybridkv.cli.specs import parse_size, parse_tokens
from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import check_max
from hybridkv.layouts.grouping import POOL_MODES

INSTALL_HINT = "pip install 'hybridkv[engine]'"
DEFAULT_GPU_MEM = "64MiB"
MAX_SEED = 2**64 - 1
MAX_THREADS = 4096
MAX_SEQ_LEN = 1 << 20  # tokens per request when the config names no max_position_embeddings
_IDS = re.compile(r"^\s*\d+(?:[\s,]+\d+)*\s*$", re.ASCII)
CHECKED_FAMILIES = ("gemma3_text", "gemma2", "gpt_oss", "cohere2", "llama4_text", "qwen3_next", "bamba")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class EngineModel(NamedTuple):
    """What MODEL named: the loaded causal LM, its tokenizer (None for random weights), and
    the largest position it was built for (None when the config does not say)."""

    model: Any
    tokenizer: Any
    vocab_size: int
    max_positions: int | None


def require_engine() -> None:
    """ConfigError with the install line when torch or transformers is missing."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"the reference engine needs torch and transformers ({e.msg}); "
                          f"install them with: {INSTALL_HINT}") from None


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL, --gpu-mem, --device, --pools and --seed: one definition for both commands."""
    p.add_argument("model", metavar="MODEL",
                   help="a transformers model_type such as gemma3_text (tiny sizes, seeded random weights), "
                        "a local Hugging Face directory or .gguf file (its weights and tokenizer), or a "
                        "config.json path (random weights at its sizes)")
    p.add_argument("--gpu-mem", default=DEFAULT_GPU_MEM,
                   help=f"bytes for the KV pages on --device, e.g. 64MiB (default {DEFAULT_GPU_MEM})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model and pages live")
    p.add_argument("--pools", choices=POOL_MODES, default="shared",
                   help="shared: one arena of equal pages (default); per-lifecycle: a pool per life cycle")
    p.add_argument("--seed", type=int, default=0, help="seeds the random weights and the sampling (default 0)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default 0: torch's choice; on a busy or small machine 1 is often "
                        "much faster for a tiny model)")


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be in [0, 2^64 - 1], got {seed}")


def load_engine_model(arg: str, seed: int, device: str, threads: int = 0) -> EngineModel:
    """The model MODEL names, in float32 on ``device``; ConfigError naming MODEL otherwise."""
    if not 0 <= threads <= MAX_THREADS:
        raise ConfigError(f"--threads must be in [0, {MAX_THREADS}] (0: torch's choice), got {threads}")
    require_engine()
    import torch

    from hybridkv.runtime import build_model
    from hybridkv.runtime.gguf_file import is_gguf_path

    if threads:
        torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device; use --device cpu")
    tokenizer = None
    model: Any
    try:
        if os.path.isdir(arg) or is_gguf_path(arg):
            from transformers.utils import logging as hf_logging

            # stderr is for errors (and serve-bench's own bar), not transformers' loading bars; its
            # GGUF reader draws one of its own that the switch does not reach
            hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
            with contextlib.redirect_stderr(io.StringIO()):
                model = build_model(arg)
            tokenizer = _tokenizer(arg)
        elif arg.endswith(".json") or os.path.isfile(arg):
            model = build_model(_config_file(arg), seed=seed)
        else:
            _check_model_type(arg)
            model = build_model(arg, seed=seed)
    except Exception as e:  # any config transformers refuses (its validators raise their own classes)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"MODEL {arg!r}: transformers cannot build it ({brief(e)})") from None
    text = getattr(model.config, "text_config", None) or model.config
    max_positions = getattr(text, "max_position_embeddings", None)
    return EngineModel(model.to(device), tokenizer, int(text.vocab_size),
                       int(max_positions) if max_positions else None)


def brief(e: BaseException) -> str:
    """An exception as one short line: transformers' messages can list every model class."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {text}"[:240]


def cannot_run(model: str, e: BaseException) -> ConfigError:
    """The error for a model transformers built but the engine cannot run (its layers do not
    match the layout hybridkv read from its config)."""
    return ConfigError(f"MODEL {model!r}: the reference engine cannot run it ({brief(e)}); it is checked on "
                       f"{', '.join(CHECKED_FAMILIES)}")


def _check_model_type(name: str) -> None:
    from transformers import CONFIG_MAPPING

    if name not in CONFIG_MAPPING:
        raise ConfigError(f"MODEL {name!r}: not a transformers model_type, a directory or a config.json path; "
                          f"e.g. {', '.join(CHECKED_FAMILIES)}")


def _config_file(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"MODEL {path!r}: cannot read the config file ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"MODEL {path!r}: not a JSON config ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ConfigError(f"MODEL {path!r}: a config.json needs a 'model_type' string (e.g. \"gemma3_text\")")
    return data


def _tokenizer(path: str) -> Any:
    """The tokenizer a model directory or a GGUF file carries; None when it has none."""
    from hybridkv.runtime.gguf_file import is_gguf_path, load_gguf_tokenizer

    if is_gguf_path(path):
        return load_gguf_tokenizer(path)
    if not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def make_engine(em: EngineModel, args: argparse.Namespace, max_seq_len: int, max_batch_size: int,
                lengths: str) -> Any:
    """An Engine over ``em.model`` sized for ``max_batch_size`` requests of ``max_seq_len``
    tokens; ``lengths`` names the options that set them, for the error messages."""
    from hybridkv.runtime import Engine, EngineConfig

    if em.max_positions is not None and max_seq_len > em.max_positions:
        raise ConfigError(f"{lengths}: requests of up to {max_seq_len} tokens exceed the model's "
                          f"max_position_embeddings ({em.max_positions}); give shorter lengths")
    check_max(f"{lengths}: tokens per request", max_seq_len, MAX_SEQ_LEN, "give shorter lengths")
    config = EngineConfig(gpu_bytes=parse_size(args.gpu_mem, "--gpu-mem"), max_seq_len=max_seq_len,
                          max_batch_size=max_batch_size, pools=args.pools, token_budget=max(512, max_batch_size),
                          prefix_cache=getattr(args, "prefix_cache", True), device=args.device)
    try:
        return Engine(em.model, config)
    except (RuntimeError, MemoryError) as e:  # torch's allocation failures (OutOfMemoryError included)
        raise ConfigError(f"--gpu-mem {args.gpu_mem}: cannot allocate the pages on {args.device} ({brief(e)}); "
                          "give a smaller --gpu-mem") from None
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError) as e:
        if isinstance(e, ConfigError):
            raise
        raise cannot_run(args.model, e) from None


def prompt_ids(text: str, em: EngineModel) -> list[int]:
    """Token ids of ``--prompt``: the tokenizer's, else ids as given, else UTF-8 bytes % vocab."""
    if em.tokenizer is not None:
        ids = [int(t) for t in em.tokenizer.encode(text)]
    elif _IDS.match(text):
        words = re.split(r"[\s,]+", text.strip())
        bad = next((w for w in words if len(w) > 18 or int(w) >= em.vocab_size), None)
        if bad is not None:
            raise ConfigError(f"--prompt: token id {bad:.40} is outside the vocabulary (0..{em.vocab_size - 1}); "
                              "give smaller ids, or text")
        ids = [int(w) for w in words]
    else:
        ids = [b % em.vocab_size for b in text.encode("utf-8", "surrogateescape")]
    if not ids:
        raise ConfigError("--prompt is empty; give text or token ids such as \"1 2 3\"")
    return ids


class _TextStream:
    """Prints what decoding the outputs so far adds (a token may end inside a character)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.shown = tokenizer, ""
        self.ids: list[int] = []

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text


def _stream(engine: Any, args: argparse.Namespace, tokenizer: Any) -> list[int]:
    """Run the one request to the end, printing each token as it comes (not with --json)."""
    text = _TextStream(tokenizer) if tokenizer is not None and not args.json else None
    outputs: list[int] = []
    try:
        for event in engine.stream():
            outputs.append(event.token)
            if text is not None:
                text.add(event.token)
            elif not args.json:
                print(event.token, flush=True)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # a model whose layers break the layout
        if isinstance(e, ConfigError) or outputs:
            raise
        raise cannot_run(args.model, e) from None
    if text is not None:
        print(flush=True)
    return outputs


def cmd_generate(args: argparse.Namespace) -> int:
    check_seed(args.seed)
    if not (args.temperature >= 0.0 and args.temperature < float("inf")):
        raise ConfigError(f"--temperature must be >= 0 and finite (0 is greedy), got {args.temperature}")
    max_new = parse_tokens(args.max_new_tokens, "--max-new-tokens")
    if max_new < 1:
        raise ConfigError("--max-new-tokens must be >= 1")
    em = load_engine_model(args.model, args.seed, args.device, args.threads)
    ids = prompt_ids(args.prompt, em)
    engine = make_engine(em, args, len(ids) + max_new - 1, 1, "--prompt + --max-new-tokens")
    eos = None if em.tokenizer is None else em.tokenizer.eos_token_id
    start = time.monotonic()
    engine.add_request(ids, max_new, args.temperature, args.seed, [] if eos is None else [eos])
    outputs = _stream(engine, args, em.tokenizer)
    elapsed = time.monotonic() - start
    if args.json:
        decoded = None if em.tokenizer is None else em.tokenizer.decode(outputs, skip_special_tokens=True)
        print(json.dumps({"model": args.model, "device": args.device, "pools": args.pools, "seed": args.seed,
                          "temperature": args.temperature, "prompt_ids": ids, "output_ids": outputs,
                          "text": decoded, "elapsed_s": round(elapsed, 6),
                          "tokens_per_s": round(len(outputs) / elapsed, 3) if elapsed > 0 else None}, indent=2))
    return 0


def add_generate_parser(subparsers: Any) -> None:
    """Register ``generate`` on the ``hybridkv`` command's subparsers."""
    g = subparsers.add_parser("generate", help="stream one prompt's tokens from the reference engine",
                              description="\n\n".join((__doc__ or "").split("\n\n")[:2]),
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="example: hybridkv generate gemma3_text --prompt '1 2 3' --max-new-tokens 8")
    add_engine_arguments(g)
    g.add_argument("--prompt", required=True,
                   help="with a tokenizer (a model directory or .gguf file that has one): text. Without one "
                        "(random weights): token ids such as '1 2 3' or '1,2,3', else plain text read as its UTF-8 "
                        "bytes modulo the vocabulary")
    g.add_argument("--max-new-tokens", default="16",
                   help="tokens to generate (default 16); a tokenizer's end-of-sequence token stops earlier")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); else sampled, seeded")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object at the end (prompt_ids, output_ids, text, tokens_per_s) instead of "
                        "streaming")
    g.set_defaults(func=cmd_generate)
