"""The life-cycle contract: every question the rest of hybridkv asks about a layer's blocks.

A request with history ``h`` has computed tokens ``[0, h)``; with capacity ``c`` it may hold
tokens ``[0, c)`` after this step, so this step computes queries at positions ``h .. c-1``.
A kind (full, sliding window, chunked, ssm, encoder: one file each) answers, pure and
vectorized over NumPy arrays of capacities / histories:

- geometry: the block ordinals a request of capacity ``c`` spans, the table width, the
  stale range at history ``h`` (``[sink_blocks, stale_stop(h))``), hence its live blocks;
- the worst case: where a decode's live blocks can drop (``drop_period_tokens``);
- reuse: what a fork shares and copies, what a publish keeps, what a match needs, and the
  keys its cached pages go under;
- the engine's addressing: which positions a step writes, which positions a page holds;
- the ideal: how many tokens one request keeps live at a length, without pages.

Nothing outside the kinds branches on the kind: callers ask these questions instead. A kind
registers its layout JSON ``type`` (``register_layer_type``) so a new kind is one new file
plus a registration.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
Present = Callable[[int], bool]
"""Is block ``j`` cached (usably) for this layer group?"""


def as_array(x: npt.ArrayLike) -> IntArray:
    return np.asarray(x, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class BlockRange:
    """Half-open range of block ordinals ``[start, stop)``; empty when ``stop <= start``."""

    start: int
    stop: int

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class ForkPages(NamedTuple):
    """What a fork at ``tokens`` takes from the donor in one layer group: the block ordinals
    it needs (ascending) and which of them are copied into fresh slots (the rest are shared)."""

    ordinals: IntArray
    copied: BoolArray


class Positions(NamedTuple):
    """Token positions one layer group's pages hold, for the engine: ``item`` picks the
    request (of a batch) or the page (of a list of pages) each position belongs to,
    ``position`` is the token (for a state page: the last token the state has seen),
    ``ordinal`` the block it sits in and ``in_page`` its token slot inside that page."""

    item: IntArray
    position: IntArray
    ordinal: IntArray
    in_page: IntArray


class MatchSearch:
    """The highest ``b <= bound`` (whole blocks of a prompt) one layer group accepts as the
    history a new request resumes at. ``sink_bound`` is asked once, then ``highest`` with a
    bound that only decreases; a kind keeps what it verified between calls, so each block is
    looked up at most once. The default accepts any ``b`` (the group needs nothing cached)."""

    def sink_bound(self, bound: int) -> int:
        return bound

    def highest(self, bound: int) -> int:
        return bound


class LifeCycle(abc.ABC):
    """How one layer's blocks live and die. Subclasses are frozen dataclasses (hashable: the
    worst-case search is memoized on tuples of them), validated once in ``__post_init__``."""

    __slots__ = ()

    per_token: ClassVar[bool] = True
    """Pages hold ``tokens_per_block`` tokens (buffers with ``bytes_per_token``); False: one
    page per request holds a state (buffers with ``state_bytes``)."""
    deepest_first: ClassVar[bool] = True
    """Eviction order of this group's cached blocks: deepest first (a continuation needs
    every block) or, when False, shallowest first (only the newest window is ever needed)."""
    own_keys: ClassVar[bool] = False
    """True when ``reuse_keys`` puts this group's cached pages under keys of their own, not
    the prompt's block keys (an encoder's, keyed by its input)."""

    # ---- identity --------------------------------------------------------------------------
    @abc.abstractmethod
    def describe(self) -> str:
        """Short name for reports: ``full``, ``window(4096+4 sinks)``, ``chunked(8192)``..."""

    @property
    def window_tokens(self) -> int | None:
        return None

    @property
    def chunk_tokens(self) -> int | None:
        return None

    @property
    def sink_tokens(self) -> int:
        return 0

    def span_tokens(self) -> int | None:
        """Tokens a query can see besides sinks (window or chunk); None when unbounded."""
        return None

    # ---- geometry --------------------------------------------------------------------------
    def blocks_spanned(self, capacity: npt.ArrayLike, tokens_per_block: int) -> IntArray:
        """Block ordinals ``[0, n)`` a request of this capacity spans before stale release."""
        return -(-as_array(capacity) // tokens_per_block)

    def span_key(self) -> object:
        """Kinds with equal keys span the same ordinals at every capacity (a step computes
        their new and freed tail entries once)."""
        return "tokens"

    def width_at(self, capacity: int, tokens_per_block: int) -> int:
        """Table columns a batch whose longest request has ``capacity`` tokens uses (scalar)."""
        return -(-capacity // tokens_per_block)

    def last_page_tokens(self, capacity: npt.NDArray[Any], tokens_per_block: int) -> npt.NDArray[Any]:
        """Tokens in each request's last page (FlashInfer's ``last_page_len``)."""
        return np.asarray(capacity - (np.maximum(-(-capacity // tokens_per_block), 1) - 1) * tokens_per_block)

    def table_width(self, max_seq_len: int, tokens_per_block: int) -> int:
        """Columns of this group's block table: the most ordinals one request can span."""
        return -(-max_seq_len // tokens_per_block)

    def sink_blocks(self, tokens_per_block: int) -> int:
        """Blocks ``[0, sink_blocks)`` that never go stale although later ones do."""
        return 0

    def keep_start(self, history: npt.ArrayLike) -> IntArray | None:
        """First non-sink token any query at a position >= ``history`` still needs; None when
        no token ever goes stale."""
        return None

    def stale_stop(self, history: npt.ArrayLike, tokens_per_block: int) -> IntArray | None:
        """End of the stale block range at ``history`` (it starts at ``sink_blocks``; it is
        empty when the stop is below that); None when blocks never go stale."""
        ks = self.keep_start(history)
        return None if ks is None else ks // tokens_per_block

    def stale_range(self, history: int, tokens_per_block: int) -> BlockRange:
        """Blocks no query at a position >= ``history`` will attend to."""
        first, stop = self.sink_blocks(tokens_per_block), self.stale_stop(history, tokens_per_block)
        return BlockRange(first, first if stop is None else max(first, int(stop)))

    def live_blocks(self, capacity: npt.ArrayLike, history: npt.ArrayLike, tokens_per_block: int) -> IntArray:
        """Slots one request of (capacity, history) holds: the spanned blocks minus the
        stale range. Vectorized."""
        total = self.blocks_spanned(capacity, tokens_per_block)
        stop = self.stale_stop(history, tokens_per_block)
        if stop is None:
            return total
        first = self.sink_blocks(tokens_per_block)
        stale: IntArray = np.clip(np.minimum(stop, total) - first, 0, None)
        return total - stale

    def is_bounded_below(self, max_len: int) -> bool:
        """True when a request's live blocks stop growing before ``max_len`` tokens."""
        span = self.span_tokens()
        return span is not None and span < max_len

    def drop_period_tokens(self) -> int | None:
        """Between two block starts a decode's live blocks never shrink, except where a kind
        drops a whole span at multiples of this many tokens (chunked attention). None: never."""
        return None

    def ideal_live_tokens(self, length: npt.ArrayLike) -> npt.NDArray[Any]:
        """Tokens one request of ``length`` keeps live without pages (0 for a state kind:
        its bytes are the layer's ``state_bytes``). Lengths may be fractional (a cost
        model's mid-chunk point)."""
        return np.asarray(length)

    # ---- demand with a shared prefix -------------------------------------------------------
    def shared_demand(self, capacity: IntArray, history: IntArray, tokens_per_block: int, shared_blocks: int) -> int:
        """Slots these requests hold together when their first ``shared_blocks`` blocks are
        one set of pages: each shared live block counted once."""
        live = self.live_blocks(capacity, history, tokens_per_block)
        if shared_blocks == 0:
            return int(live.sum())
        total = self.blocks_spanned(capacity, tokens_per_block)
        sinks = np.minimum(self.sink_blocks(tokens_per_block), total)
        stop = self.stale_stop(history, tokens_per_block)
        start = sinks if stop is None else np.maximum(stop, sinks)
        # each request's live blocks inside the shared range: [0, a) and [start, b)
        a = np.minimum(sinks, shared_blocks)
        b = np.minimum(total, shared_blocks)
        inside = a + np.clip(b - start, 0, None)
        union = covered(np.concatenate([[0], start]), np.concatenate([[a.max(initial=0)], b]))
        return int((live - inside).sum()) + union

    # ---- reuse -----------------------------------------------------------------------------
    def fork_refusal(self, tokens: int, capacity: int) -> str | None:
        """Why a fork at ``tokens`` of a donor at ``capacity`` cannot be served (None: it can)."""
        return None

    def fork_pages(self, tokens: int, tokens_per_block: int) -> ForkPages:
        """The live blocks at history ``tokens``; full blocks are shared, a partly filled
        last block is copied (neither cache may write a page the other reads)."""
        ords = self.held_ordinals(tokens, tokens_per_block)
        return ForkPages(ords, ords >= tokens // tokens_per_block)

    def held_ordinals(self, tokens: int, tokens_per_block: int) -> IntArray:
        """Ordinals a request with history = capacity = ``tokens`` holds (its live blocks)."""
        blocks = np.arange(int(self.blocks_spanned(tokens, tokens_per_block)), dtype=np.int64)
        r = self.stale_range(tokens, tokens_per_block)
        return blocks[(blocks < r.start) | (blocks >= r.stop)]

    def reuse_copies(self, count: int) -> BoolArray:
        """Which of ``count`` matched or published pages are copied into fresh pages instead of
        shared by reference: none by default (a written block never changes); a state that
        keeps changing copies every one."""
        return np.zeros(count, np.bool_)

    def publish_sources(self, held: IntArray, ordinals: IntArray) -> IntArray:
        """Table ordinals of the request's pages that back the published ``ordinals`` (the
        same ordinals, unless the kind caches a snapshot under another one)."""
        return ordinals

    def publish_ordinals(self, held: IntArray, upto: int, capacity: int, tokens_per_block: int) -> IntArray:
        """Which held block ordinals a publish of ``upto`` tokens (whole blocks, <= capacity)
        caches; a copying kind's page is cached under the returned ordinal."""
        return held[held < upto // tokens_per_block]

    def reuse_keys(self, keys: Sequence[bytes], root: bytes, tokens_per_block: int) -> Sequence[bytes]:
        """Keys this group's cached pages go under (block ``j``'s page under key ``j``): the
        prompt's block keys, unless the kind's content is keyed by something else."""
        return keys

    def chain_root(self, root: bytes) -> bytes:
        """The parent of the first key ``reuse_keys`` gives (the scope's root by default)."""
        return root

    def needed_blocks(self, num_blocks: int, tokens_per_block: int) -> IntArray:
        """Ordinals (ascending) this group needs cached to resume at history
        ``num_blocks * tokens_per_block``: exactly the blocks live there."""
        return self.held_ordinals(num_blocks * tokens_per_block, tokens_per_block) if num_blocks else _EMPTY

    def match_search(self, present: Present, tokens_per_block: int, num_blocks: int) -> MatchSearch:
        """A search for the highest history (in blocks) this group can serve from the cache."""
        return MatchSearch()

    def serves(self, ordinal: int, tokens_per_block: int) -> tuple[int, int | None]:
        """The matches (histories in blocks, ``[lo, hi]``; ``hi`` None: unbounded) that need
        cached block ``ordinal`` of this group: ``b`` with ``ordinal in needed_blocks(b)``;
        empty when ``hi < lo``. Every block is needed from ``ordinal + 1`` on; one that never
        goes stale forever."""
        return ordinal + 1, None

    # ---- the engine's addressing -----------------------------------------------------------
    def written(self, capacity: IntArray, history: IntArray, seen: IntArray, tokens_per_block: int) -> Positions:
        """Positions a step from history to capacity writes (``seen``: where each request's
        pages stood before, for kinds that write only on a change)."""
        index, pos = expand(np.arange(capacity.size, dtype=np.int64), history, capacity - history)
        return Positions(index, pos, pos // tokens_per_block, pos % tokens_per_block)

    def readable(self, ordinals: IntArray, seen: int, tokens_per_block: int) -> Positions:
        """Positions the held pages ``ordinals`` hold for a request whose tokens ``[0, seen)``
        were computed; ``item`` picks the page."""
        return page_positions(ordinals, seen, tokens_per_block)

    def entry_positions(self, ordinal: int, tokens_per_block: int) -> Positions:
        """Positions a cached page of block ``ordinal`` holds."""
        return page_positions(np.array([ordinal], np.int64), (ordinal + 1) * tokens_per_block, tokens_per_block)


_EMPTY: IntArray = np.zeros(0, np.int64)


def page_positions(ordinals: IntArray, limit: int, tokens_per_block: int) -> Positions:
    """Every token position below ``limit`` that the pages of block ``ordinals`` hold;
    ``item`` picks the page."""
    pos = (ordinals[:, None] * tokens_per_block + np.arange(tokens_per_block)[None, :]).ravel()
    index = np.repeat(np.arange(ordinals.size, dtype=np.int64), tokens_per_block)
    keep = pos < limit
    pos = pos[keep]
    return Positions(index[keep], pos, pos // tokens_per_block, pos % tokens_per_block)


def expand(rows: IntArray, start: IntArray, count: IntArray) -> tuple[IntArray, IntArray]:
    """All (rows[i], start[i] + k) for k < count[i], in order; count may hold zeros. One
    ``repeat`` instead of a Python loop over variable-length ranges."""
    idx = np.flatnonzero(count > 0)
    if idx.size == 0:
        return _EMPTY, _EMPTY
    cnt, r, s = count[idx], rows[idx], start[idx]
    if int(cnt.max()) == 1:
        return r, s
    offsets = np.arange(int(cnt.sum()), dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    return np.repeat(r, cnt), np.repeat(s, cnt) + offsets


def covered(starts: IntArray, ends: IntArray) -> int:
    """Integers covered by the union of ``[starts[i], ends[i])``."""
    s, e = starts[ends > starts], ends[ends > starts]
    if s.size == 0:
        return 0
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    reach = np.concatenate([[0], np.maximum.accumulate(e)[:-1]])
    return int(np.clip(e - np.maximum(s, reach), 0, None).sum())


# ---- layout JSON types -------------------------------------------------------------------

FieldReader = Callable[[str, int, bool], "int | None"]
"""``read(field, minimum, optional)``: an integer field of a layout JSON layer entry (a
ConfigError names the field when it is missing, not an integer, below ``minimum`` or too big)."""


@dataclass(frozen=True, slots=True)
class LayerType:
    """A layout JSON layer ``type``: the fields it takes (besides ``type``, ``count`` and the
    bytes field its pages need) and how it builds the life cycle."""

    name: str
    fields: frozenset[str]
    build: Callable[[FieldReader], LifeCycle]
    per_token: bool


LAYER_TYPES: dict[str, LayerType] = {}


def register_layer_type(name: str, fields: Sequence[str], build: Callable[[FieldReader], LifeCycle],
                        per_token: bool) -> None:
    """Make ``{"type": name, ...}`` a layout JSON layer (``per_token``: its pages hold tokens
    and it takes ``kv_bytes_per_token``; else a state, ``state_bytes``)."""
    if name in LAYER_TYPES:
        raise ConfigError(f"layer type {name!r} is registered twice")
    LAYER_TYPES[name] = LayerType(name, frozenset(fields), build, per_token)
