"""The hybridkv layout JSON: a model written by hand.

Shape (``count`` repeats the entry; ``window: null`` and no ``chunk`` is full attention)::

    {"name": "my-model",
     "max_position_embeddings": 32768,                      # optional
     "layers": [
       {"type": "attention", "window": 4096, "sink_tokens": 4, "chunk": null,
        "kv_bytes_per_token": 4096, "count": 20},
       {"type": "ssm", "state_bytes": 1097728, "count": 36}]}

Layer types are registered by the life-cycle kinds (``lifecycles.register_layer_type``), each
with its own fields; a token-holding type takes ``kv_bytes_per_token``, a state type
``state_bytes``.

An attention layer's ``kv_bytes_per_token`` is split into K and V halves when even, else kept
as one ``kv`` buffer. Unknown, missing or contradictory fields raise ConfigError naming the
field and the file.
"""

from __future__ import annotations

from typing import Any

from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_BYTES, MAX_LAYERS, MAX_TOKENS, check_max
from hybridkv.layouts.spec import BufferSpec, LayerSpec, ModelLayout
from hybridkv.lifecycles import LAYER_TYPES

_TOP_KEYS = {"name", "layers", "max_position_embeddings"}


_MAXIMUM = {"max_position_embeddings": MAX_TOKENS, "kv_bytes_per_token": MAX_BYTES, "state_bytes": MAX_BYTES,
            "count": MAX_LAYERS}  # every other field is a life cycle's token count


def _int(entry: dict[str, Any], key: str, where: str, minimum: int, optional: bool = False,
         ) -> int | None:
    value = entry.get(key)
    if value is None and optional:
        return None
    if value is None:
        raise ConfigError(f"{where}: missing field {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: field {key!r} must be an integer >= {minimum}, got {value!r:.60}")
    check_max(f"{where}: field {key!r}", value, _MAXIMUM.get(key, MAX_TOKENS), "no model needs that much")
    return value


def _buffers(entry: dict[str, Any], where: str, per_token: bool) -> tuple[BufferSpec, ...]:
    """A token-holding layer's ``kv_bytes_per_token`` split into K and V halves when even
    (else one ``kv`` buffer: halves of 1 byte would be empty); a state layer's ``state_bytes``."""
    if not per_token:
        state = _int(entry, "state_bytes", where, 1)
        assert state is not None
        return (BufferSpec("state", state_bytes=state),)
    kv = _int(entry, "kv_bytes_per_token", where, 1)
    assert kv is not None
    return (BufferSpec("kv", kv),) if kv % 2 else (BufferSpec("k", kv // 2), BufferSpec("v", kv // 2))


def _layer(entry: Any, where: str) -> tuple[LayerSpec, int]:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each layer entry must be an object")
    kind = entry.get("type")
    lt = LAYER_TYPES.get(kind) if isinstance(kind, str) else None
    if lt is None:
        names = " or ".join(repr(n) for n in sorted(LAYER_TYPES))
        raise ConfigError(f"{where}: field 'type' must be {names}, got {kind!r:.60}")
    allowed = lt.fields | {"type", "count", "kv_bytes_per_token" if lt.per_token else "state_bytes"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown} for type {kind!r}; "
                          f"allowed: {sorted(allowed)}")
    count = _int(entry, "count", where, 1, optional=True) or 1
    try:
        lc = lt.build(lambda key, minimum, optional: _int(entry, key, where, minimum, optional))
    except ConfigError as e:
        raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    buffers = _buffers(entry, where, lt.per_token)
    return LayerSpec(lc, buffers), count


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
