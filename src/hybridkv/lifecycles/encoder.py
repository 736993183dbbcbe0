"""Encoder output for cross-attention (Whisper, T5-style encoder-decoders, Llama 3.2 Vision):
``tokens`` encoder positions per request, computed once when the cache first gets capacity,
never grown and never stale; ``ceil(tokens / tpb)`` blocks while the request has any tokens.

Its content depends on the encoder input, not on the decoder's tokens, so its cached pages go
under a key chain of their own rooted at the request's reuse scope (which names the encoder
input: ``ReuseScope(inputs=digest)``)::

    decoder groups   root ─> key_0 ─> key_1 ─> ...          (prompt blocks)
    encoder group    root ─> enc_0 ─> enc_1 ─> ... enc_{E-1}  (encoder blocks, E = ceil(tokens/tpb))

A request resuming at any history ``L > 0`` needs all ``E`` encoder pages (the decoder's
cached KV was computed against them); at ``L = 0`` it computes the encoder itself. Forks and
hits share the pages: nothing ever writes them again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_TOKENS, check_max
from hybridkv.lifecycles.base import (
    FieldReader,
    ForkPages,
    IntArray,
    LifeCycle,
    MatchSearch,
    Positions,
    Present,
    as_array,
    expand,
    page_positions,
    register_layer_type,
)

_CHAIN_TAG = b"hybridkv/encoder/v1\x00"


class _AllOrNothing(MatchSearch):
    """Any history needs every encoder page: all present accepts the bound, else only 0."""

    def __init__(self, present: Present, num_blocks: int) -> None:
        self.ok = all(present(j) for j in range(num_blocks))

    def highest(self, bound: int) -> int:
        return bound if self.ok else 0


@dataclass(frozen=True, slots=True)
class Encoder(LifeCycle):
    """``tokens`` encoder positions per request."""

    tokens: int
    own_keys: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or self.tokens < 1:
            raise ConfigError(f"encoder tokens must be >= 1, got {self.tokens}")
        check_max("encoder tokens", self.tokens, MAX_TOKENS, "no encoder is that long")

    def describe(self) -> str:
        return f"encoder({self.tokens})"

    def num_blocks(self, tokens_per_block: int) -> int:
        return -(-self.tokens // tokens_per_block)

    def blocks_spanned(self, capacity: npt.ArrayLike, tokens_per_block: int) -> IntArray:
        return (as_array(capacity) > 0).astype(np.int64) * self.num_blocks(tokens_per_block)

    def span_key(self) -> object:
        return ("encoder", self.tokens)

    def width_at(self, capacity: int, tokens_per_block: int) -> int:
        return self.num_blocks(tokens_per_block)

    def last_page_tokens(self, capacity: npt.NDArray[Any], tokens_per_block: int) -> npt.NDArray[Any]:
        last = self.tokens - (self.num_blocks(tokens_per_block) - 1) * tokens_per_block
        return (capacity > 0).astype(capacity.dtype) * last

    def table_width(self, max_seq_len: int, tokens_per_block: int) -> int:
        return self.num_blocks(tokens_per_block)

    def is_bounded_below(self, max_len: int) -> bool:
        return True

    def ideal_live_tokens(self, length: npt.ArrayLike) -> npt.NDArray[Any]:
        return (np.asarray(length) > 0) * self.tokens

    def shared_demand(self, capacity: IntArray, history: IntArray, tokens_per_block: int, shared_blocks: int) -> int:
        live = self.live_blocks(capacity, history, tokens_per_block)
        return int(live.max(initial=0)) if shared_blocks else int(live.sum())  # one encoder input: one set

    def fork_pages(self, tokens: int, tokens_per_block: int) -> ForkPages:
        n = self.num_blocks(tokens_per_block)
        return ForkPages(np.arange(n, dtype=np.int64), np.zeros(n, np.bool_))

    def publish_ordinals(self, held: IntArray, upto: int, capacity: int, tokens_per_block: int) -> IntArray:
        return held if upto >= tokens_per_block else held[:0]

    def reuse_keys(self, keys: Sequence[bytes], root: bytes, tokens_per_block: int) -> Sequence[bytes]:
        prev, out = self.chain_root(root), []
        for j in range(self.num_blocks(tokens_per_block)):
            prev = hashlib.sha256(prev + j.to_bytes(8, "little")).digest()
            out.append(prev)
        return out

    def chain_root(self, root: bytes) -> bytes:
        """The parent of encoder block 0's key."""
        return hashlib.sha256(_CHAIN_TAG + root).digest()

    def held_ordinals(self, tokens: int, tokens_per_block: int) -> IntArray:
        return np.arange(self.num_blocks(tokens_per_block) if tokens > 0 else 0, dtype=np.int64)

    def match_search(self, present: Present, tokens_per_block: int, num_blocks: int) -> MatchSearch:
        return _AllOrNothing(present, self.num_blocks(tokens_per_block))

    def written(self, capacity: IntArray, history: IntArray, seen: IntArray, tokens_per_block: int) -> Positions:
        """The encoder runs once: in the step that first gives a request capacity."""
        rows = np.flatnonzero((capacity > 0) & (seen == 0))
        index, pos = expand(rows, np.zeros(rows.size, np.int64), np.full(rows.size, self.tokens, np.int64))
        return Positions(index, pos, pos // tokens_per_block, pos % tokens_per_block)

    def readable(self, ordinals: IntArray, seen: int, tokens_per_block: int) -> Positions:
        return page_positions(ordinals, self.tokens, tokens_per_block)  # written whole, at the first step

    def entry_positions(self, ordinal: int, tokens_per_block: int) -> Positions:
        return page_positions(np.array([ordinal], np.int64), self.tokens, tokens_per_block)


def _build(read: FieldReader) -> LifeCycle:
    tokens = read("tokens", 1, False)
    assert tokens is not None
    return Encoder(tokens)


register_layer_type("encoder", ("tokens",), _build, per_token=True)
