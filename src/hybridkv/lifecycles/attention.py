"""The layout JSON ``attention`` type: full, sliding-window or chunked attention, told apart by
its ``window`` / ``chunk`` fields (``window: null`` and no ``chunk`` is full attention)."""

from __future__ import annotations

from hybridkv.core.errors import ConfigError
from hybridkv.lifecycles.base import FieldReader, LifeCycle, register_layer_type
from hybridkv.lifecycles.chunked import Chunked
from hybridkv.lifecycles.full import Full
from hybridkv.lifecycles.sliding import Sliding


def _build(read: FieldReader) -> LifeCycle:
    window = read("window", 1, True)
    chunk = read("chunk", 1, True)
    sinks = read("sink_tokens", 0, True) or 0
    if window is not None and chunk is not None:
        raise ConfigError("give 'window' or 'chunk', not both")
    if sinks and window is None:
        raise ConfigError("'sink_tokens' needs a 'window' (full attention keeps all)")
    if chunk is not None:
        return Chunked(chunk)
    return Full() if window is None else Sliding(window, sinks)


register_layer_type("attention", ("window", "sink_tokens", "chunk"), _build, per_token=True)
