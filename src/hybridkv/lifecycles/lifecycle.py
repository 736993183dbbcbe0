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

from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_TOKENS, check_max, show
from hybridkv.core.types import LifeCycleKind

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
        for what, tokens in (("window", self.window_tokens), ("chunk", self.chunk_tokens),
                             ("sink_tokens", self.sink_tokens)):
            check_max(what, tokens or 0, MAX_TOKENS, "no model attends that far")
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


MAX_DECODE_POSITIONS = 1 << 21
"""Positions worst_decode_blocks may evaluate. One chunk size needs at most
``min(tpb, max_len / tpb) + 2 <= 2^20 + 2``; only several chunk sizes with a huge common
period in one pool group can need more."""


def decode_positions(lcs: tuple[LifeCycle, ...], tokens_per_block: int, max_len: int) -> IntArray:
    """Histories ``h < max_len`` at which a decode's summed live blocks over ``lcs`` can peak.

    A block is added only when ``h`` reaches a block start (a multiple of tpb) and stale
    ranges only grow, so no position beats the block start before it. From one block start
    to the next, full, windowed and SSM groups never lose a block (a window's live blocks
    grow, then stay); a chunked group loses its chunk when the next block start passes a
    chunk boundary. So the peak is at the last block start before ``max_len`` or at a block
    start just before a chunk boundary; and as the chunked part repeats every ``lcm(chunk,
    tpb)`` tokens while the rest never shrinks, only the last such period counts::

        tokens   ... | k*tpb ........ m*chunk ........ (k+1)*tpb | ...
                       ^ candidate: the chunk [.., m*chunk) is still whole here

    Exact, and a handful of positions for any window or length.
    """
    last = (max_len - 1) // tokens_per_block  # block index of the last decode position
    chunks = sorted({lc.chunk_tokens for lc in lcs if lc.chunk_tokens is not None})
    period = 1  # in blocks
    for c in chunks:
        period = math.lcm(period, math.lcm(c, tokens_per_block) // tokens_per_block)
    first = max(0, last - period + 1)
    parts = [np.array([last], np.int64)]
    for c in chunks:
        if c <= tokens_per_block:  # every block holds a chunk boundary
            count, lo = last - first + 1, first
        else:  # boundaries m * c in (first * tpb, last * tpb]: the block start before each
            lo, hi = first * tokens_per_block // c + 1, last * tokens_per_block // c
            count = hi - lo + 1
        if sum(len(p) for p in parts) + count > MAX_DECODE_POSITIONS:
            raise ConfigError(f"chunk sizes {chunks} share one pool group at tokens_per_block "
                              f"{tokens_per_block}: their pattern repeats only every "
                              f"{show(period * tokens_per_block)} tokens, too many positions to check "
                              f"up to max_seq_len {max_len}; lower --max-seq-len or give the "
                              "chunked layers different slot sizes")
        steps = np.arange(lo, lo + max(count, 0), dtype=np.int64)
        parts.append(steps if c <= tokens_per_block else -(-steps * c // tokens_per_block) - 1)
    return np.concatenate(parts) * tokens_per_block  # repeats are harmless: only the max is taken


@functools.lru_cache(maxsize=4096)
def worst_decode_blocks(lcs: tuple[LifeCycle, ...], tokens_per_block: int, max_len: int) -> int:
    """max over histories h < max_len of sum over ``lcs`` of live_blocks(h + 1, h).

    The worst case of one decoding request whose layer groups ``lcs`` share a pool group.
    ``max_len < 1`` means no tokens: 0.
    """
    if max_len < 1:
        return 0
    check_max("max_len", max_len, MAX_TOKENS, "lower --max-seq-len")
    h = decode_positions(lcs, tokens_per_block, max_len)
    total = np.zeros_like(h)
    for lc in lcs:
        total += live_blocks(lc, h + 1, h, tokens_per_block)
    return int(total.max())
