"""The demand function: how many slots a batch of requests needs in each pool group.

This is the one place that turns (capacity, history) pairs into slot counts. The planner's
floors, the concurrency / sequence-length reports, the scheduler's admission gate and the
simulator all call it; nothing re-derives it.

A shared prefix (a system prompt of ``P`` tokens every request of the batch starts with) is
counted once: its full blocks ``[0, P // tpb)`` are shared where live (the partly filled last
block is each request's own copy). SSM state is never shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_REQUESTS, MAX_TOKENS, check_max
from hybridkv.layouts.grouping import GroupedLayout
from hybridkv.lifecycles import IntArray, LifeCycle, live_blocks
from hybridkv.lifecycles import worst_decode_blocks as _worst


@dataclass(frozen=True, slots=True)
class Batch:
    """Requests that must be in memory at the same time (a *constraint* or a *typical step*).

    Per request a capacity (tokens it may hold after the step) and a history (tokens already
    computed); ``shared_prefix_tokens`` leading tokens are the same in every request.
    """

    name: str
    capacity: tuple[int, ...]
    history: tuple[int, ...]
    shared_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if len(self.capacity) != len(self.history):
            raise ConfigError(f"batch {self.name!r}: {len(self.capacity)} capacities but "
                              f"{len(self.history)} histories")
        if not self.capacity:
            raise ConfigError(f"batch {self.name!r} has no requests")
        check_max(f"batch {self.name!r}: requests", len(self.capacity), MAX_REQUESTS, "split it or lower the count")
        check_max(f"batch {self.name!r}: capacity", max(self.capacity), MAX_TOKENS, "shorten the requests")
        for c, h in zip(self.capacity, self.history, strict=True):
            if not 0 <= h <= c or c < 1:
                raise ConfigError(f"batch {self.name!r}: need 0 <= history <= capacity and "
                                  f"capacity >= 1, got capacity {c}, history {h}")
        if not 0 <= self.shared_prefix_tokens <= min(self.capacity):
            raise ConfigError(f"batch {self.name!r}: shared prefix {self.shared_prefix_tokens} "
                              f"must be >= 0 and <= the shortest request ({min(self.capacity)})")

    @staticmethod
    def uniform(
        name: str, count: int, capacity: int, history: int | None = None, prefix: int = 0
    ) -> Batch:
        """``count`` equal requests; history defaults to capacity - 1 (a decode step)."""
        if count < 1:
            raise ConfigError(f"batch {name!r}: count must be >= 1, got {count}")
        check_max(f"batch {name!r}: requests", count, MAX_REQUESTS, "split it or lower the count")
        h = capacity - 1 if history is None else history
        return Batch(name, (capacity,) * count, (h,) * count, prefix)

    def __len__(self) -> int:
        return len(self.capacity)


def layer_group_demand(
    lc: LifeCycle, tokens_per_block: int, capacity: IntArray, history: IntArray, prefix: int = 0
) -> int:
    """Slots one layer group needs for these requests, a shared prefix counted once."""
    return lc.shared_demand(capacity, history, tokens_per_block, prefix // tokens_per_block)


def demand(
    grouped: GroupedLayout,
    capacity: npt.ArrayLike,
    history: npt.ArrayLike,
    shared_prefix_tokens: int = 0,
) -> tuple[int, ...]:
    """Slots per pool group (indexed by pool group id) for requests at (capacity, history)."""
    c = np.asarray(capacity, dtype=np.int64)
    h = np.asarray(history, dtype=np.int64)
    out = [0] * len(grouped.pool_groups)
    for (lc, pg), count in _families(grouped).items():
        out[pg] += count * layer_group_demand(lc, grouped.tokens_per_block, c, h, shared_prefix_tokens)
    return tuple(out)


def _families(grouped: GroupedLayout) -> dict[tuple[LifeCycle, int], int]:
    """Layer groups per (life cycle, pool group): an arena's page-sized parts of one life
    cycle need the same blocks, so demand evaluates each family once, times its size."""
    families: dict[tuple[LifeCycle, int], int] = {}
    for lg in grouped.layer_groups:
        key = (lg.life_cycle, int(lg.pool_group))
        families[key] = families.get(key, 0) + 1
    return families


def batch_demand(grouped: GroupedLayout, batch: Batch) -> tuple[int, ...]:
    """``demand`` for a Batch."""
    return demand(grouped, batch.capacity, batch.history, batch.shared_prefix_tokens)


def worst_request_demand(grouped: GroupedLayout, max_len: int) -> tuple[int, ...]:
    """Per pool group: the most slots one request needs while decoding at any history
    ``h < max_len`` (the window straddle included). Exact: see lifecycle.worst_decode_blocks."""
    tpb = grouped.tokens_per_block
    return tuple(_worst(grouped.life_cycles(pg.id), tpb, max_len) for pg in grouped.pool_groups)


def concurrent_decode_demand(grouped: GroupedLayout, count: int, max_len: int) -> tuple[int, ...]:
    """Per pool group: slots for ``count`` requests decoding at once at worst-case positions.

    Layer groups whose live blocks stay bounded below ``max_len`` (windows, chunks, SSM) count
    their worst case over every history < max_len; the others (full attention, or a window
    as long as the sequence) count one block per request: ``count`` short requests. Memory for
    long requests is guaranteed by the single-request floor and the typical-step split.
    """
    tpb = grouped.tokens_per_block
    out = []
    for pg in grouped.pool_groups:
        per_request = 0
        for lc in grouped.life_cycles(pg.id):
            bounded = lc.is_bounded_below(max_len)
            per_request += _worst((lc,), tpb, max_len) if bounded else min(1, max_len)
        out.append(count * per_request)
    return tuple(out)


def per_request_demand(grouped: GroupedLayout, capacity: npt.ArrayLike, history: npt.ArrayLike) -> IntArray:
    """Slots each request needs, per pool group: an ``[n_requests, n_pool_groups]`` array
    (no sharing). The scheduler's vectorized admission gate and victim choice use it."""
    c = np.asarray(capacity, dtype=np.int64)
    h = np.asarray(history, dtype=np.int64)
    out = np.zeros((c.size, len(grouped.pool_groups)), dtype=np.int64)
    for (lc, pg), count in _families(grouped).items():
        out[:, pg] += count * live_blocks(lc, c, h, grouped.tokens_per_block)
    return out


def lifetime_peak_demand(grouped: GroupedLayout, prompt_tokens: int, total_tokens: int,
                         chunk_tokens: int) -> tuple[int, ...]:
    """Per pool group: the most slots one request ever needs on its way from nothing to
    ``total_tokens``: prefill chunks of at most ``chunk_tokens`` starting at any history below
    ``prompt_tokens``, then one-token decodes. Exact (every history is evaluated)."""
    if not 0 < prompt_tokens <= total_tokens or chunk_tokens < 1:
        raise ConfigError(f"need 0 < prompt ({prompt_tokens}) <= total ({total_tokens}) and chunk >= 1")
    h = np.arange(total_tokens, dtype=np.int64)
    c = np.where(h < prompt_tokens, np.minimum(h + chunk_tokens, prompt_tokens), h + 1)
    return tuple(int(x) for x in per_request_demand(grouped, c, h).max(axis=0))
