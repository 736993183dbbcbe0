"""One entry point for a model argument: a catalog name, a hybridkv layout JSON, or a
Hugging Face config.json (told apart by their fields)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from hybridkv.core.errors import ConfigError
from hybridkv.layouts.catalog import catalog_layout
from hybridkv.layouts.hf_config import parse_hf_config
from hybridkv.layouts.json_format import parse_layout
from hybridkv.layouts.spec import ModelLayout

MAX_MODEL_FILE_BYTES = 1 << 24
"""A config.json is a few KiB and a layout JSON less; 16 MiB is no model file."""


def _file_status(arg: str) -> os.stat_result | None:
    """``stat`` of ``arg``, or None where no file answers to that name (none there, a name
    too long for the file system, a NUL byte)."""
    try:
        return os.stat(arg)
    except (OSError, ValueError):
        return None


def _read_text(arg: str) -> str:
    """The model file's text; ConfigError naming the path for anything but a readable,
    regular, UTF-8 file of sane size. A FIFO or device is refused before it is opened
    (opening a FIFO blocks until a writer comes)."""
    st = _file_status(arg)
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ConfigError(f"{arg}: {kind}; give a layout JSON or config.json file")
    try:
        with open(arg, "rb") as f:
            data = f.read(MAX_MODEL_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{arg}: cannot read the model file ({e.strerror or e})") from None
    if len(data) > MAX_MODEL_FILE_BYTES:
        raise ConfigError(f"{arg}: larger than {MAX_MODEL_FILE_BYTES >> 20} MiB; not a model file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{arg}: the model file is not UTF-8 text (expected JSON)") from None


def _parse_json(arg: str, text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{arg}: malformed JSON at line {e.lineno} column {e.colno}: "
                          f"{e.msg}") from None
    except ValueError:  # int() refuses a number of more than 4300 digits
        raise ConfigError(f"{arg}: a number in the JSON has thousands of digits; no model field "
                          "needs that") from None
    except RecursionError:
        raise ConfigError(f"{arg}: JSON nested too deeply to read; a model file is a few levels "
                          "deep") from None


def load_model(arg: str) -> ModelLayout:
    """The layout named by ``arg``: a path to a layout/config JSON file, else a catalog name."""
    if Path(arg).suffix != ".json" and _file_status(arg) is None:
        return catalog_layout(arg)
    data = _parse_json(arg, _read_text(arg))
    if isinstance(data, dict) and "layers" in data:
        return parse_layout(data, arg)
    if isinstance(data, dict) and ({"num_hidden_layers", "layers_block_type", "text_config"} & data.keys()):
        return parse_hf_config(data, arg)  # transformers 5 Nemotron-H saves only layers_block_type
    raise ConfigError(f"{arg}: neither a hybridkv layout (needs 'layers') nor a Hugging Face "
                      "config.json (needs 'num_hidden_layers' or 'layers_block_type')")
