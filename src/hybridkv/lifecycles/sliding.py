"""Sliding-window attention with optional sink tokens (Gemma, Mistral, GPT-OSS, StreamingLLM).

A query at ``p`` sees keys ``[0, S)`` and ``[p - W + 1, p]`` (``W`` tokens counting itself).
The straddle: ``W`` tokens starting mid-block touch ``ceil((W-1)/tpb) + 1`` blocks, one more
than ``W / tpb`` suggests, so floors use the worst case over positions (lifecycles/worst.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_TOKENS, check_max
from hybridkv.lifecycles.base import IntArray, as_array
from hybridkv.lifecycles.windowed import Windowed


@dataclass(frozen=True, slots=True)
class Sliding(Windowed):
    """A window of ``window_tokens`` tokens plus ``sink_tokens`` that are always kept."""

    window: int
    sinks: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or self.window < 1:
            raise ConfigError(f"window must be >= 1 token, got {self.window}; use full attention (a null window) "
                              "to keep every token")
        if self.sinks < 0:
            raise ConfigError(f"sink_tokens must be >= 0, got {self.sinks}")
        check_max("window", self.window, MAX_TOKENS, "no model attends that far")
        check_max("sink_tokens", self.sinks, MAX_TOKENS, "no model attends that far")

    @property
    def window_tokens(self) -> int | None:
        return self.window

    @property
    def sink_tokens(self) -> int:
        return self.sinks

    def describe(self) -> str:
        return f"window({self.window}{f'+{self.sinks} sinks' if self.sinks else ''})"

    def span_tokens(self) -> int | None:
        return self.window

    def sink_blocks(self, tokens_per_block: int) -> int:
        return -(-self.sinks // tokens_per_block)

    def keep_start(self, history: npt.ArrayLike) -> IntArray:
        return np.maximum(as_array(history) - self.window + 1, 0)

    def ideal_live_tokens(self, length: npt.ArrayLike) -> npt.NDArray[Any]:
        return np.asarray(np.minimum(np.asarray(length), self.window + self.sinks))
