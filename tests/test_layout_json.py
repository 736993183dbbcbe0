"""The hybridkv layout JSON, read through models.load_model from files in tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import model_files
from hybridkv.core.errors import ConfigError
from hybridkv.layouts.json_format import parse_layout
from hybridkv.layouts.models import load_model
from hybridkv.layouts.spec import BufferSpec
from hybridkv.lifecycles import Chunked, Full, Sliding, Ssm
from model_files import assert_error_names_file_and_field, load

DOCSTRING_EXAMPLE: dict[str, Any] = {
    "name": "my-model",
    "max_position_embeddings": 32768,
    "layers": [
        {"type": "attention", "window": 4096, "sink_tokens": 4, "chunk": None,
         "kv_bytes_per_token": 4096, "count": 20},
        {"type": "ssm", "state_bytes": 1097728, "count": 36},
    ],
}


def write(tmp_path: Path, data: Any, name: str = "layout.json") -> str:
    return model_files.write(tmp_path, data, name)


def one_layer(**fields: Any) -> dict[str, Any]:
    return {"name": "m", "layers": [{"type": "attention", "kv_bytes_per_token": 256, **fields}]}


def test_documented_shape(tmp_path: Path) -> None:
    path = write(tmp_path, DOCSTRING_EXAMPLE)
    layout = load_model(path)
    assert layout.name == "my-model"
    assert layout.max_position_embeddings == 32768
    assert layout.source == f"layout:{path}"
    assert len(layout.layers) == 56
    attn, ssm = layout.layers[0], layout.layers[20]
    assert all(layer == attn for layer in layout.layers[:20])
    assert all(layer == ssm for layer in layout.layers[20:])
    assert attn.life_cycle == Sliding(4096, 4)
    assert attn.buffers == (BufferSpec("k", 2048), BufferSpec("v", 2048))
    assert attn.kv_bytes_per_token == 4096
    assert ssm.life_cycle == Ssm()
    assert ssm.buffers == (BufferSpec("state", state_bytes=1097728),)
    assert ssm.state_bytes == 1097728
    assert layout.kv_bytes_per_token() == 20 * 4096


def test_count_repeats_in_order(tmp_path: Path) -> None:
    layout = load(tmp_path, {"name": "m", "layers": [
        {"type": "attention", "kv_bytes_per_token": 8, "count": 2},
        {"type": "attention", "kv_bytes_per_token": 8, "window": 16},
        {"type": "ssm", "state_bytes": 100, "count": 3},
        {"type": "attention", "kv_bytes_per_token": 8, "chunk": 32, "count": 1},
    ]})
    assert [layer.life_cycle for layer in layout.layers] == [
        Full(), Full(), Sliding(16),
        Ssm(), Ssm(), Ssm(), Chunked(32),
    ]


def test_max_position_embeddings_is_optional(tmp_path: Path) -> None:
    assert load(tmp_path, one_layer()).max_position_embeddings is None


def test_window_null_is_full(tmp_path: Path) -> None:
    for fields in ({"window": None}, {}, {"window": None, "chunk": None, "sink_tokens": 0}):
        layer = load(tmp_path, one_layer(**fields)).layers[0]
        assert layer.life_cycle == Full()
        assert isinstance(layer.life_cycle, Full)


def test_chunk_is_chunked(tmp_path: Path) -> None:
    lc = load(tmp_path, one_layer(chunk=8192)).layers[0].life_cycle
    assert lc == Chunked(8192)
    assert (lc.chunk_tokens, lc.window_tokens, lc.sink_tokens) == (8192, None, 0)


def test_sink_tokens_default_zero(tmp_path: Path) -> None:
    lc = load(tmp_path, one_layer(window=128)).layers[0].life_cycle
    assert lc == Sliding(128)
    assert lc.sink_tokens == 0
    assert load(tmp_path, one_layer(window=128, sink_tokens=4)).layers[0].life_cycle.sink_tokens == 4


def test_odd_kv_bytes_is_one_buffer(tmp_path: Path) -> None:
    layer = load(tmp_path, one_layer(kv_bytes_per_token=1153)).layers[0]
    assert layer.buffers == (BufferSpec("kv", 1153),)
    assert layer.kv_bytes_per_token == 1153
    assert layer.page_bytes(16) == 1153 * 16


def test_even_kv_bytes_is_k_and_v_halves(tmp_path: Path) -> None:
    layer = load(tmp_path, one_layer(kv_bytes_per_token=1152)).layers[0]
    assert layer.buffers == (BufferSpec("k", 576), BufferSpec("v", 576))
    assert layer.page_bytes(16) == 1152 * 16


def test_parse_layout_directly_matches_load_model(tmp_path: Path) -> None:
    path = write(tmp_path, DOCSTRING_EXAMPLE)
    assert parse_layout(DOCSTRING_EXAMPLE, path) == load_model(path)


# --- errors: ConfigError naming the file and the field ------------------------------------

ERRORS: list[tuple[str, Any, str]] = [
    ("unknown layer field", one_layer(heads=8), "heads"),
    ("unknown ssm field", {"name": "m", "layers": [{"type": "ssm", "state_bytes": 8, "window": 4}]},
     "window"),
    ("unknown top-level field", {**one_layer(), "dtype": "bf16"}, "dtype"),
    ("missing kv_bytes_per_token", {"name": "m", "layers": [{"type": "attention"}]},
     "kv_bytes_per_token"),
    ("missing state_bytes", {"name": "m", "layers": [{"type": "ssm"}]}, "state_bytes"),
    ("kv_bytes_per_token 0", one_layer(kv_bytes_per_token=0), "kv_bytes_per_token"),
    ("kv_bytes_per_token string", one_layer(kv_bytes_per_token="4096"), "kv_bytes_per_token"),
    ("window 0", one_layer(window=0), "window"),
    ("window negative", one_layer(window=-5), "window"),
    ("window float", one_layer(window=4096.0), "window"),
    ("chunk 0", one_layer(chunk=0), "chunk"),
    ("negative count", one_layer(count=-2), "count"),
    ("count 0", one_layer(count=0), "count"),
    ("count true", one_layer(count=True), "count"),
    ("negative sink_tokens", one_layer(window=8, sink_tokens=-1), "sink_tokens"),
    ("window and chunk", one_layer(window=4096, chunk=8192), "chunk"),
    ("sink_tokens without window", one_layer(sink_tokens=4), "sink_tokens"),
    ("sink_tokens with chunk", one_layer(chunk=64, sink_tokens=4), "sink_tokens"),
    ("type foo", {"name": "m", "layers": [{"type": "foo", "kv_bytes_per_token": 8}]}, "type"),
    ("type missing", {"name": "m", "layers": [{"kv_bytes_per_token": 8}]}, "type"),
    ("layer not an object", {"name": "m", "layers": [42]}, "layers[0]"),
    ("empty layers", {"name": "m", "layers": []}, "layers"),
    ("layers not a list", {"name": "m", "layers": {"type": "ssm"}}, "layers"),
    ("missing name", {"layers": one_layer()["layers"]}, "name"),
    ("max_position_embeddings 0", {**one_layer(), "max_position_embeddings": 0}, "max_position_embeddings"),
]


@pytest.mark.parametrize(("data", "field"), [(d, f) for _, d, f in ERRORS], ids=[i for i, _, _ in ERRORS])
def test_errors_name_file_and_field(tmp_path: Path, data: Any, field: str) -> None:
    assert_error_names_file_and_field(tmp_path, data, field)


def test_window_and_chunk_message_names_both(tmp_path: Path) -> None:
    path = write(tmp_path, one_layer(window=4096, chunk=8192))
    with pytest.raises(ConfigError, match=r"'window' or 'chunk', not both") as info:
        load_model(path)
    assert str(info.value).startswith(f"{path}: layers[0]: ")


def test_error_names_the_entry_index(tmp_path: Path) -> None:
    data = {"name": "m", "layers": [{"type": "ssm", "state_bytes": 8},
                                    {"type": "attention", "kv_bytes_per_token": 8, "window": 0}]}
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=r"layers\[1\]: field 'window' must be an integer >= 1, got 0"):
        load_model(path)


def test_malformed_json_mentions_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"name": "m",\n "layers": [\n  {"type": "ssm",, "state_bytes": 8}]}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"malformed JSON at line 3 column") as info:
        load_model(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("data", [[1, 2], "layers", 7, None])
def test_non_object_file(tmp_path: Path, data: Any) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match="needs 'layers'") as info:
        load_model(path)
    assert path in str(info.value)


def test_parse_layout_non_object() -> None:
    with pytest.raises(ConfigError, match=r"^x\.json: a layout file must hold one JSON object"):
        parse_layout([{"type": "ssm"}], "x.json")


def test_missing_json_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="cannot read the model file") as info:
        load_model(path)
    assert path in str(info.value)


def test_non_utf8_file_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(ConfigError, match=r"binary\.json"):
        load_model(str(path))
