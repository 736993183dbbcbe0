"""One entry point for a model argument: a catalog name, a hybridkv layout JSON, or a
Hugging Face config.json (told apart by their fields)."""

from __future__ import annotations

import json
from pathlib import Path

from hybridkv.catalog import catalog_layout
from hybridkv.errors import ConfigError
from hybridkv.hf_config import parse_hf_config
from hybridkv.layout import ModelLayout
from hybridkv.layout_json import parse_layout


def load_model(arg: str) -> ModelLayout:
    """The layout named by ``arg``: a path to a layout/config JSON file, else a catalog name."""
    path = Path(arg)
    if not (path.suffix == ".json" or path.exists()):
        return catalog_layout(arg)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{arg}: cannot read the model file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{arg}: the model file is not UTF-8 text (expected JSON)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{arg}: malformed JSON at line {e.lineno} column {e.colno}: "
                          f"{e.msg}") from None
    if isinstance(data, dict) and "layers" in data:
        return parse_layout(data, arg)
    if isinstance(data, dict) and ("num_hidden_layers" in data or "text_config" in data):
        return parse_hf_config(data, arg)
    raise ConfigError(f"{arg}: neither a hybridkv layout (needs 'layers') nor a Hugging Face "
                      "config.json (needs 'num_hidden_layers')")
