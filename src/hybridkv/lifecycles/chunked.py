"""Chunked local attention (Llama 4): a query at ``p`` sees only its own chunk
``[C * (p // C), p]``, so a decode drops the whole previous chunk when it crosses a boundary."""

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
class Chunked(Windowed):
    """Chunks of ``chunk_tokens`` tokens; no sinks."""

    chunk: int

    def __post_init__(self) -> None:
        if isinstance(self.chunk, bool) or self.chunk < 1:
            raise ConfigError(f"chunk must be >= 1 token, got {self.chunk}")
        check_max("chunk", self.chunk, MAX_TOKENS, "no model attends that far")

    @property
    def chunk_tokens(self) -> int | None:
        return self.chunk

    def describe(self) -> str:
        return f"chunked({self.chunk})"

    def span_tokens(self) -> int | None:
        return self.chunk

    def keep_start(self, history: npt.ArrayLike) -> IntArray:
        return (as_array(history) // self.chunk) * self.chunk

    def drop_period_tokens(self) -> int | None:
        return self.chunk

    def ideal_live_tokens(self, length: npt.ArrayLike) -> npt.NDArray[Any]:
        return np.asarray(np.minimum(np.asarray(length), self.chunk))
