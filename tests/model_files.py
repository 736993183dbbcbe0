"""Helpers the model-file tests share: write a JSON file, load it, check an error message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hybridkv.core.errors import ConfigError
from hybridkv.layouts.models import load_model
from hybridkv.layouts.spec import ModelLayout


def write(tmp_path: Path, data: Any, name: str = "model.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def load(tmp_path: Path, data: Any) -> ModelLayout:
    return load_model(write(tmp_path, data))


def assert_error_names_file_and_field(tmp_path: Path, data: Any, field: str) -> None:
    """Loading ``data`` fails with a ConfigError naming the file and ``field``."""
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_model(path)
    message = str(info.value)
    assert path in message
    assert field in message
