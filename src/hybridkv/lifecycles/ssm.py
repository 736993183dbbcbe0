"""Recurrent state (Mamba, gated delta net, linear attention): one constant-size state page per
request while it has any tokens, nothing ever stale.

Reuse copies, never shares: the state keeps changing as the request runs, so a fork or a
prefix hit starts from a copy in a page of its own. A state exists only at the point the
engine last ran to (the capacity after a step), so a fork must be at the donor's capacity,
and a publish caches a *snapshot* of the state taken at exactly ``upto`` tokens, stored under
the key of block ``upto / tpb - 1``; a match at history ``L`` needs the snapshot at ``L``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from hybridkv.lifecycles.base import (
    BoolArray,
    ForkPages,
    IntArray,
    LifeCycle,
    MatchSearch,
    Positions,
    Present,
    as_array,
    register_layer_type,
)


class _SnapshotSearch(MatchSearch):
    """The highest ``b`` with a snapshot at ``b - 1``; ``b`` only decreases, so a snapshot
    below the last accepted ``b`` was never looked at."""

    def __init__(self, present: Present) -> None:
        self.present, self.accepted = present, -1

    def highest(self, bound: int) -> int:
        b = bound
        if b != self.accepted:
            while b > 0 and not self.present(b - 1):
                b -= 1
            self.accepted = b
        return b


@dataclass(frozen=True, slots=True)
class Ssm(LifeCycle):
    """One state per request (its buffers give ``state_bytes``)."""

    per_token: ClassVar[bool] = False

    def describe(self) -> str:
        return "ssm"

    def blocks_spanned(self, capacity: npt.ArrayLike, tokens_per_block: int) -> IntArray:
        return (as_array(capacity) > 0).astype(np.int64)

    def span_key(self) -> object:
        return "state"

    def width_at(self, capacity: int, tokens_per_block: int) -> int:
        return 1

    def last_page_tokens(self, capacity: npt.NDArray[Any], tokens_per_block: int) -> npt.NDArray[Any]:
        return (capacity > 0).astype(capacity.dtype)

    def table_width(self, max_seq_len: int, tokens_per_block: int) -> int:
        return 1

    def is_bounded_below(self, max_len: int) -> bool:
        return True

    def ideal_live_tokens(self, length: npt.ArrayLike) -> npt.NDArray[Any]:
        return np.zeros_like(np.asarray(length))

    def shared_demand(self, capacity: IntArray, history: IntArray, tokens_per_block: int, shared_blocks: int) -> int:
        return int(self.live_blocks(capacity, history, tokens_per_block).sum())  # a state each

    def fork_refusal(self, tokens: int, capacity: int) -> str | None:
        if tokens == capacity:
            return None
        # after a step the engine has run positions history .. capacity-1: the state is at
        # capacity, and no snapshot of an earlier point exists
        return (f"SSM state exists only at the donor's capacity ({capacity} tokens); step it to "
                "history = capacity and commit, then fork at that length")

    def fork_pages(self, tokens: int, tokens_per_block: int) -> ForkPages:
        return ForkPages(np.zeros(1, np.int64), np.ones(1, np.bool_))

    def publish_ordinals(self, held: IntArray, upto: int, capacity: int, tokens_per_block: int) -> IntArray:
        if upto != capacity or upto < tokens_per_block or held.size == 0:
            return np.zeros(0, np.int64)
        return np.array([upto // tokens_per_block - 1], np.int64)

    def held_ordinals(self, tokens: int, tokens_per_block: int) -> IntArray:
        return np.zeros(int(tokens > 0), np.int64)

    def reuse_copies(self, count: int) -> BoolArray:
        return np.ones(count, np.bool_)

    def publish_sources(self, held: IntArray, ordinals: IntArray) -> IntArray:
        return held  # the state page, cached as the snapshot of block ``upto / tpb - 1``

    def needed_blocks(self, num_blocks: int, tokens_per_block: int) -> IntArray:
        return np.array([num_blocks - 1] if num_blocks else [], np.int64)

    def match_search(self, present: Present, tokens_per_block: int, num_blocks: int) -> MatchSearch:
        return _SnapshotSearch(present)

    def serves(self, ordinal: int, tokens_per_block: int) -> tuple[int, int | None]:
        return ordinal + 1, ordinal + 1  # the snapshot after block ``ordinal`` and nothing else

    def written(self, capacity: IntArray, history: IntArray, seen: IntArray, tokens_per_block: int) -> Positions:
        """The state moves to ``capacity`` only when that differs from where it stands (a
        step that leaves a forked child at its fork point runs nothing)."""
        idx = np.flatnonzero((capacity > 0) & (capacity != seen))
        zero = np.zeros(idx.size, np.int64)
        return Positions(idx, capacity[idx] - 1, zero, zero)

    def readable(self, ordinals: IntArray, seen: int, tokens_per_block: int) -> Positions:
        n = int(ordinals.size > 0 and seen > 0)
        zero = np.zeros(n, np.int64)
        return Positions(zero, np.full(n, seen - 1, np.int64), zero, zero)

    def entry_positions(self, ordinal: int, tokens_per_block: int) -> Positions:
        zero = np.zeros(1, np.int64)  # the snapshot of the state after the entry's block
        return Positions(zero, np.array([(ordinal + 1) * tokens_per_block - 1], np.int64), zero, zero)


register_layer_type("ssm", (), lambda read: Ssm(), per_token=False)
