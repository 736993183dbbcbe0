"""The hybridkv layout JSON: a model written by hand.

Shape (``count`` repeats the entry; ``window: null`` and no ``chunk`` is full attention)::

    {"name": "my-model",
     "max_position_embeddings": 32768,                      # optional
     "layers": [
       {"type": "attention", "window": 4096, "sink_tokens": 4, "chunk": null,
        "kv_bytes_per_token": 4096, "count": 20},
       {"type": "ssm", "state_bytes": 1097728, "count": 36}]}

An attention layer's ``kv_bytes_per_token`` is split into K and V halves when even, else kept
as one ``kv`` buffer. Unknown, missing or contradictory fields raise ConfigError naming the
field and the file.
"""

from __future__ import annotations

from typing import Any

from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_BYTES, MAX_LAYERS, MAX_TOKENS, check_max
from hybridkv.layouts.spec import BufferSpec, LayerSpec, ModelLayout
from hybridkv.lifecycles.lifecycle import LifeCycle

_ATTENTION_KEYS = {"type", "window", "sink_tokens", "chunk", "kv_bytes_per_token", "count"}
_SSM_KEYS = {"type", "state_bytes", "count"}
_TOP_KEYS = {"name", "layers", "max_position_embeddings"}


_MAXIMUM = {"window": MAX_TOKENS, "sink_tokens": MAX_TOKENS, "chunk": MAX_TOKENS, "max_position_embeddings": MAX_TOKENS,
            "kv_bytes_per_token": MAX_BYTES, "state_bytes": MAX_BYTES, "count": MAX_LAYERS}


def _int(entry: dict[str, Any], key: str, where: str, minimum: int, optional: bool = False,
         ) -> int | None:
    value = entry.get(key)
    if value is None and optional:
        return None
    if value is None:
        raise ConfigError(f"{where}: missing field {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: field {key!r} must be an integer >= {minimum}, got {value!r:.60}")
    check_max(f"{where}: field {key!r}", value, _MAXIMUM[key], "no model needs that much")
    return value


def _attention(entry: dict[str, Any], where: str) -> LayerSpec:
    window = _int(entry, "window", where, 1, optional=True)
    chunk = _int(entry, "chunk", where, 1, optional=True)
    sinks = _int(entry, "sink_tokens", where, 0, optional=True) or 0
    kv = _int(entry, "kv_bytes_per_token", where, 1)
    assert kv is not None
    if window is not None and chunk is not None:
        raise ConfigError(f"{where}: give 'window' or 'chunk', not both")
    if sinks and window is None:
        raise ConfigError(f"{where}: 'sink_tokens' needs a 'window' (full attention keeps all)")
    lc = LifeCycle.chunked(chunk) if chunk is not None else (
        LifeCycle.full() if window is None else LifeCycle.sliding(window, sinks))
    if kv % 2:  # odd: one buffer (built only then: halves of 1 byte would be empty buffers)
        return LayerSpec(lc, (BufferSpec("kv", kv),))
    return LayerSpec(lc, (BufferSpec("k", kv // 2), BufferSpec("v", kv // 2)))


def _layer(entry: Any, where: str) -> tuple[LayerSpec, int]:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each layer entry must be an object")
    kind = entry.get("type")
    allowed = {"attention": _ATTENTION_KEYS, "ssm": _SSM_KEYS}.get(kind) if isinstance(kind, str) else None
    if allowed is None:
        raise ConfigError(f"{where}: field 'type' must be 'attention' or 'ssm', got {kind!r:.60}")
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown} for type {kind!r}; "
                          f"allowed: {sorted(allowed)}")
    count = _int(entry, "count", where, 1, optional=True) or 1
    if kind == "attention":
        return _attention(entry, where), count
    state = _int(entry, "state_bytes", where, 1)
    assert state is not None
    return LayerSpec(LifeCycle.ssm(), (BufferSpec("state", state_bytes=state),)), count


def parse_layout(data: Any, path: str) -> ModelLayout:
    """Build a ModelLayout from parsed layout JSON read from ``path``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a layout file must hold one JSON object")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level field(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name or not name.isprintable():
        raise ConfigError(f"{path}: field 'name' must be a non-empty string of printable characters")
    layers_data = data.get("layers")
    if not isinstance(layers_data, list) or not layers_data:
        raise ConfigError(f"{path}: field 'layers' must be a non-empty list")
    max_pos = _int(data, "max_position_embeddings", path, 1, optional=True)
    layers: list[LayerSpec] = []
    for i, entry in enumerate(layers_data):
        where = f"{path}: layers[{i}]"
        try:
            layer, count = _layer(entry, where)
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        check_max(f"{where}: layers in the model with this 'count'", len(layers) + count, MAX_LAYERS,
                  "no model has that many layers")
        layers += [layer] * count
    return ModelLayout(name, tuple(layers), max_pos, f"layout:{path}")
