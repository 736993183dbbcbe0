"""Life cycles: which of a request's blocks are still live, and which are stale.

A request with history ``h`` has computed tokens ``[0, h)``; with capacity ``c`` it may hold
tokens ``[0, c)`` after this step, so this step computes queries at positions ``h .. c-1``.

Attention with a window of ``W`` tokens and ``S`` sink tokens: a query at position ``p`` sees
keys ``[0, S)`` and ``[p - W + 1, p]`` (``W`` tokens counting itself; full attention is
``W = None``). Chunked local attention with chunk ``C``: a query at ``p`` sees
``[C * (p // C), p]``. Every later query starts at ``p >= h``, so the first non-sink token
anyone still needs is ``keep_start(h)``::

    tokens  0 ... S-1 | S ............ keep_start(h)-1 | keep_start(h) ... h-1 | h ... c-1
            sinks     |  stale: no future query looks   |  window still needed   |  this step
    blocks  [0, ceil(S/tpb))   [ceil(S/tpb), keep_start(h) // tpb)   [keep_start(h) // tpb, ceil(c/tpb))
            live (sink blocks)  stale range                          live

A block holding any sink token stays; a block is stale only when *all* its tokens are stale.
The straddle: ``W`` tokens starting mid-block touch ``ceil((W-1)/tpb) + 1`` blocks, one
more than ``W / tpb`` suggests, so the worst case over positions is what floors must use.

SSM (linear attention, Mamba) layers hold one constant-size state per request: one slot while
the request has any tokens, nothing stale.

Every function here is pure and vectorized over NumPy arrays of capacities / histories; the
demand function, planner, manager and simulator all count live blocks through these.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from hybridkv.errors import ConfigError
from hybridkv.types import LifeCycleKind

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class BlockRange:
    """Half-open range of block ordinals ``[start, stop)``; empty when ``stop <= start``."""

    start: int
    stop: int

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


@dataclass(frozen=True, slots=True)
class LifeCycle:
    """How a layer's blocks become stale. Build with ``full()``, ``sliding()``, ``chunked()``,
    ``ssm()``; validated once here."""

    kind: LifeCycleKind
    window_tokens: int | None = None
    sink_tokens: int = 0
    chunk_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.window_tokens is not None and self.window_tokens < 1:
            raise ConfigError(f"window must be >= 1 token, got {self.window_tokens}; "
                              "use null (None) for full attention")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ConfigError(f"chunk must be >= 1 token, got {self.chunk_tokens}")
        if self.sink_tokens < 0:
            raise ConfigError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.kind is LifeCycleKind.CHUNKED and (
            self.chunk_tokens is None or self.window_tokens is not None or self.sink_tokens
        ):
            raise ConfigError("chunked attention takes a chunk and no window or sink_tokens")
        if self.kind is LifeCycleKind.ATTENTION and self.chunk_tokens is not None:
            raise ConfigError("attention takes a window or none, not a chunk; use chunked()")
        if self.kind is LifeCycleKind.ATTENTION and self.window_tokens is None and self.sink_tokens:
            raise ConfigError("sink_tokens only make sense with a window (full attention keeps "
                              "every token)")
        if self.kind is LifeCycleKind.SSM and (
            self.window_tokens is not None or self.chunk_tokens is not None or self.sink_tokens
        ):
            raise ConfigError("ssm life cycle takes no window, chunk or sink_tokens")

    @staticmethod
    def full() -> LifeCycle:
        return LifeCycle(LifeCycleKind.ATTENTION)

    @staticmethod
    def sliding(window_tokens: int, sink_tokens: int = 0) -> LifeCycle:
        return LifeCycle(LifeCycleKind.ATTENTION, window_tokens, sink_tokens)

    @staticmethod
    def chunked(chunk_tokens: int) -> LifeCycle:
        return LifeCycle(LifeCycleKind.CHUNKED, chunk_tokens=chunk_tokens)

    @staticmethod
    def ssm() -> LifeCycle:
        return LifeCycle(LifeCycleKind.SSM)

    @property
    def is_full(self) -> bool:
        return self.kind is LifeCycleKind.ATTENTION and self.window_tokens is None

    @property
    def is_ssm(self) -> bool:
        return self.kind is LifeCycleKind.SSM

    def span_tokens(self) -> int | None:
        """Tokens a query can see besides sinks (window or chunk); None when unbounded."""
        return self.window_tokens if self.chunk_tokens is None else self.chunk_tokens

    def is_bounded_below(self, max_len: int) -> bool:
        """True when some token becomes stale before ``max_len``, i.e. the per-request live
        blocks do not grow with length (SSM, or a window/chunk shorter than ``max_len``)."""
        span = self.span_tokens()
        return self.is_ssm or (span is not None and span < max_len)

    def describe(self) -> str:
        if self.is_ssm:
            return "ssm"
        if self.kind is LifeCycleKind.CHUNKED:
            return f"chunked({self.chunk_tokens})"
        if self.window_tokens is None:
            return "full"
        sinks = f"+{self.sink_tokens} sinks" if self.sink_tokens else ""
        return f"window({self.window_tokens}{sinks})"


def _as_array(x: npt.ArrayLike) -> IntArray:
    return np.asarray(x, dtype=np.int64)


def keep_start(lc: LifeCycle, history: npt.ArrayLike) -> IntArray:
    """First non-sink token position any query at a position >= ``history`` still needs."""
    h = _as_array(history)
    if lc.kind is LifeCycleKind.CHUNKED:
        assert lc.chunk_tokens is not None
        return (h // lc.chunk_tokens) * lc.chunk_tokens
    if lc.window_tokens is None:  # full attention; SSM has no tokens at all
        return np.zeros_like(h)
    return np.maximum(h - lc.window_tokens + 1, 0)


def sink_blocks(lc: LifeCycle, tokens_per_block: int) -> int:
    """Blocks holding at least one sink token: ``[0, ceil(S / tpb))``."""
    return -(-lc.sink_tokens // tokens_per_block)


def stale_first_stop(
    lc: LifeCycle, history: npt.ArrayLike, tokens_per_block: int
) -> tuple[int, IntArray]:
    """Vectorized stale range: blocks ``[first, stop)`` (stop may be <= first: empty)."""
    return sink_blocks(lc, tokens_per_block), keep_start(lc, history) // tokens_per_block


def stale_range(lc: LifeCycle, history: int, tokens_per_block: int) -> BlockRange:
    """Blocks no query at a position >= ``history`` will attend to (SSM and full: empty)."""
    if lc.is_ssm:
        return BlockRange(0, 0)
    first, stop = stale_first_stop(lc, history, tokens_per_block)
    return BlockRange(first, max(first, int(stop)))


def live_blocks(
    lc: LifeCycle, capacity: npt.ArrayLike, history: npt.ArrayLike, tokens_per_block: int
) -> IntArray:
    """Slots one request of (capacity, history) needs in a layer group of this life cycle:
    the blocks of ``[0, capacity)`` that are not stale for ``history``. Vectorized."""
    c = _as_array(capacity)
    if lc.is_ssm:
        return (c > 0).astype(np.int64)
    total = -(-c // tokens_per_block)
    if lc.is_full:
        return total
    first, stop = stale_first_stop(lc, history, tokens_per_block)
    stale: IntArray = np.clip(np.minimum(stop, total) - first, 0, None)
    return total - stale


def _period(lc: LifeCycle, tokens_per_block: int) -> tuple[int, int]:
    """(start, period): live(h+1, h) is periodic in h with this period from start on."""
    if lc.kind is LifeCycleKind.CHUNKED:
        assert lc.chunk_tokens is not None
        return 0, math.lcm(lc.chunk_tokens, tokens_per_block)
    assert lc.window_tokens is not None
    # past this point the window no longer reaches a sink block, so only h mod tpb matters
    return sink_blocks(lc, tokens_per_block) * tokens_per_block + lc.window_tokens, tokens_per_block


def decode_positions(lcs: tuple[LifeCycle, ...], tokens_per_block: int, max_len: int) -> IntArray:
    """Histories ``h < max_len`` at which a decode's summed live blocks over ``lcs`` can peak.

    Bounded life cycles repeat with a period from some point on and full attention only
    grows, so the head (until every pattern repeats) plus the last period before ``max_len``
    contain the maximum. Exact, and small enough to evaluate densely.
    """
    head, period = 1, 1
    for lc in lcs:
        if lc.is_ssm or lc.is_full:
            continue
        start, p = _period(lc, tokens_per_block)
        head, period = max(head, start + p), math.lcm(period, p)
    head = min(head, max_len)
    tail_start = max(head, max_len - period)
    return np.concatenate([np.arange(head), np.arange(tail_start, max_len)]).astype(np.int64)


@functools.lru_cache(maxsize=4096)
def worst_decode_blocks(lcs: tuple[LifeCycle, ...], tokens_per_block: int, max_len: int) -> int:
    """max over histories h < max_len of sum over ``lcs`` of live_blocks(h + 1, h).

    The worst case of one decoding request whose layer groups ``lcs`` share a pool group.
    ``max_len < 1`` means no tokens: 0.
    """
    if max_len < 1:
        return 0
    h = decode_positions(lcs, tokens_per_block, max_len)
    total = np.zeros_like(h)
    for lc in lcs:
        total += live_blocks(lc, h + 1, h, tokens_per_block)
    return int(total.max())
