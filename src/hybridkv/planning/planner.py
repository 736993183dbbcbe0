"""The capacity planner: a memory quota and guarantees in, a slot count per pool group out.

Floors come from guarantees, never from one request alone:

1. one request of ``max_seq_len`` runs to completion alone (its worst decode position);
2. ``max_batch_size`` requests decode concurrently at worst-case positions in every pool group
   (demand.concurrent_decode_demand: the window straddle in every windowed group) -- with
   shared pools only in pools whose life cycles are all bounded (the arena reports it instead);
3. every user constraint (a Batch) fits at once.

A pool group's floor is the largest of these; memory above the floors is split in proportion to
the typical step's slot demand (water filling: a group already above its share keeps its floor,
the rest grow together). Everything goes through the one demand function. If the quota cannot
hold the floors, CapacityError says how much is needed; a quota is never silently raised.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from hybridkv.core.errors import CapacityError, ConfigError
from hybridkv.core.limits import MAX_BYTES, MAX_REQUESTS, MAX_TOKENS, check_max
from hybridkv.core.types import GIB, PoolGroupId
from hybridkv.layouts.grouping import POOL_MODES, GroupedLayout, LayerGroup, group_layers
from hybridkv.layouts.spec import ModelLayout
from hybridkv.planning.demand import Batch, batch_demand, concurrent_decode_demand, worst_request_demand

DEFAULT_TOKENS_PER_BLOCK = 16
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_SEQ_LEN_CAP = 32768
DEFAULT_POOLS = "shared"
"""One arena where a page size suits the layers (layouts/arena.py); per-lifecycle pools on request."""


def default_max_seq_len(layout: ModelLayout) -> int:
    """The model's own limit, capped at 32k so a default plan serves many requests."""
    return min(layout.max_position_embeddings or DEFAULT_MAX_SEQ_LEN_CAP, DEFAULT_MAX_SEQ_LEN_CAP)


DEFAULT_TYPICAL = "max_batch_size requests at their worst position up to max_seq_len"


def typical_demand(spec: PlanSpec, grouped: GroupedLayout) -> tuple[int, ...]:
    """Slots per pool group of the typical step. Default: max_batch_size requests, each at
    its worst decode position up to max_seq_len: the ratio that maximizes concurrency at the
    longest length the plan promises (the figure peers report, and ``max_concurrency``)."""
    if spec.typical_step is not None:
        return batch_demand(grouped, spec.typical_step)
    return tuple(spec.max_batch_size * n for n in worst_request_demand(grouped, spec.max_seq_len))


@dataclass(frozen=True, slots=True)
class PlanSpec:
    """Everything the planner needs. Validated once; never mutated."""

    layout: ModelLayout
    gpu_bytes: int
    max_seq_len: int
    tokens_per_block: int = DEFAULT_TOKENS_PER_BLOCK
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    host_bytes: int = 0
    constraints: tuple[Batch, ...] = ()
    typical_step: Batch | None = None
    slot_granularity: int = 1
    pools: str = DEFAULT_POOLS

    def __post_init__(self) -> None:
        positive = {"gpu_bytes (--gpu-mem)": self.gpu_bytes,
                    "max_seq_len (--max-seq-len)": self.max_seq_len,
                    "tokens_per_block (--tokens-per-block)": self.tokens_per_block,
                    "max_batch_size (--max-batch-size)": self.max_batch_size,
                    "slot_granularity": self.slot_granularity}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.pools not in POOL_MODES:
            raise ConfigError(f"pools (--pools) must be one of {', '.join(POOL_MODES)}, got {self.pools!r}")
        if self.host_bytes < 0:
            raise ConfigError(f"host_bytes (--host-mem) must be >= 0, got {self.host_bytes}")
        self._check_upper_bounds()
        for batch in self.constraints:
            if max(batch.capacity) > self.max_seq_len:
                raise ConfigError(f"constraint {batch.name!r} has a request of "
                                  f"{max(batch.capacity)} tokens > max_seq_len "
                                  f"{self.max_seq_len}; raise --max-seq-len or shorten it")

    def _check_upper_bounds(self) -> None:
        check_max("gpu_bytes (--gpu-mem)", self.gpu_bytes, MAX_BYTES, "lower --gpu-mem")
        check_max("host_bytes (--host-mem)", self.host_bytes, MAX_BYTES, "lower --host-mem")
        check_max("max_seq_len (--max-seq-len)", self.max_seq_len, MAX_TOKENS, "lower --max-seq-len")
        check_max("tokens_per_block (--tokens-per-block)", self.tokens_per_block, MAX_TOKENS,
                  "lower --tokens-per-block (16 is a common choice)")
        check_max("max_batch_size (--max-batch-size)", self.max_batch_size, MAX_REQUESTS, "lower --max-batch-size")
        batches = [*self.constraints, *([self.typical_step] if self.typical_step else [])]
        check_max("requests in all constraints and the typical step (--constraint, --typical)",
                  sum(len(b) for b in batches), MAX_REQUESTS, "give fewer or smaller batches")

    def typical_name(self) -> str:
        return self.typical_step.name if self.typical_step else DEFAULT_TYPICAL


@dataclass(frozen=True, slots=True)
class Floor:
    """A pool group's minimum slot count and the guarantee or constraint that set it."""

    min_slots: int
    source: str


@dataclass(frozen=True, slots=True)
class PoolGroupPlan:
    """One pool group of the plan: slot size and count, its floor and why."""

    id: PoolGroupId
    layer_groups: tuple[LayerGroup, ...]
    slot_bytes: int
    slots: int
    min_slots: int
    floor_source: str
    typical_demand: int
    host_slots: int

    @property
    def bytes(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return tuple(sorted({i for lg in self.layer_groups for i in lg.layer_ids}))  # slices share layers


@dataclass(frozen=True, slots=True)
class PoolPlan:
    """The planner's output: frozen, one entry per pool group (index = pool group id)."""

    spec: PlanSpec
    grouped: GroupedLayout
    pool_groups: tuple[PoolGroupPlan, ...]

    @property
    def gpu_bytes_used(self) -> int:
        return sum(pg.bytes for pg in self.pool_groups)

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(pg.slots for pg in self.pool_groups)


def compute_floors(spec: PlanSpec, grouped: GroupedLayout, reserve_decodes: bool = True) -> tuple[Floor, ...]:
    """Per pool group: the largest demand among the guarantees and the constraints. With
    shared pools the concurrent-decode guarantee is not a reservation in a pool whose requests
    grow with length (the arena): the report says up to which length ``max_batch_size``
    requests run together, and admission enforces it. A pool of bounded life cycles only (an
    SSM state pool that keeps its own pool) still reserves it, its need per request being
    fixed, unless ``reserve_decodes`` is False (the plan drops it rather than refuse: with
    shared pools only floor 1 and the constraints may refuse a quota)."""
    sources: list[tuple[str, tuple[int, ...]]] = [
        (f"1 request of max_seq_len {spec.max_seq_len} alone",
         worst_request_demand(grouped, spec.max_seq_len)),
    ]
    decodes = concurrent_decode_demand(grouped, spec.max_batch_size, spec.max_seq_len)
    if spec.pools == "shared":  # reserve it only where a request's need does not grow with length
        bounded = [all(lg.life_cycle.is_bounded_below(spec.max_seq_len) for lg in grouped.layer_groups
                       if lg.pool_group == pg.id) for pg in grouped.pool_groups]
        decodes = tuple(d if reserve_decodes and b else 0 for d, b in zip(decodes, bounded, strict=True))
    sources.append((f"{spec.max_batch_size} concurrent decodes (max_batch_size) at worst-case positions", decodes))
    sources += [(f"constraint {b.name!r}", batch_demand(grouped, b)) for b in spec.constraints]
    floors = []
    for g in range(len(grouped.pool_groups)):
        name, need = max(sources, key=lambda s: s[1][g])  # first wins ties
        floors.append(Floor(need[g], name))
    return tuple(floors)


def _floor_bytes(grouped: GroupedLayout, floors: tuple[Floor, ...]) -> int:
    return sum(f.min_slots * pg.slot_bytes for f, pg in zip(floors, grouped.pool_groups, strict=True))


def _check_quota(spec: PlanSpec, grouped: GroupedLayout, floors: tuple[Floor, ...]) -> None:
    need = _floor_bytes(grouped, floors)
    if need <= spec.gpu_bytes:
        return
    parts = "; ".join(
        f"pool group {pg.id} needs {f.min_slots} slots x {pg.slot_bytes} B for {f.source}"
        for f, pg in zip(floors, grouped.pool_groups, strict=True)
    )
    raise CapacityError(
        f"the KV quota --gpu-mem {spec.gpu_bytes} B ({spec.gpu_bytes / GIB:.2f} GiB) cannot hold "
        f"the pool floors: they need {need} B ({need / GIB:.2f} GiB) ({parts}). Raise --gpu-mem "
        f"to at least {need} B, or lower --max-batch-size ({spec.max_batch_size}) or "
        f"--max-seq-len ({spec.max_seq_len}), or drop constraints."
    )


def split_slots(
    slot_bytes: tuple[int, ...], floors: tuple[int, ...], typical: tuple[int, ...],
    quota: int, granularity: int = 1, spread_leftover: bool = True,
) -> tuple[int, ...]:
    """Slots per group: floors, then memory above them in proportion to ``typical``.

    Finds the largest scale k with sum(bytes * max(floor, k * typical)) <= quota, rounds each
    count down to ``granularity`` (never below its floor), then (``spread_leftover``) hands
    leftover granules to the group furthest below its share. Requires sum(bytes * floors) <= quota.
    """

    def cost(k: float) -> float:
        return sum(b * max(f, k * d) for b, f, d in zip(slot_bytes, floors, typical, strict=True))

    lo, hi = 0.0, 1.0
    while any(typical) and cost(hi) <= quota:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= quota else (lo, mid)
    slots = [max(f, granularity * int(lo * d // granularity)) for f, d in zip(floors, typical, strict=True)]
    _undo_rounding_overrun(slot_bytes, floors, typical, quota, granularity, slots)
    if spread_leftover:
        _spread_leftover(slot_bytes, typical, quota, granularity, slots)
    return tuple(slots)


def _undo_rounding_overrun(slot_bytes: tuple[int, ...], floors: tuple[int, ...], typical: tuple[int, ...],
                           quota: int, granularity: int, slots: list[int]) -> None:
    """Near 2^60 bytes the float search can overshoot the quota by a few granules: take
    them back, one at a time, from the group furthest above its share (never below a floor)."""
    while sum(b * s for b, s in zip(slot_bytes, slots, strict=True)) > quota:
        above = [g for g, (s, f) in enumerate(zip(slots, floors, strict=True)) if s - granularity >= f]
        g = max(above, key=lambda i: slots[i] / typical[i])
        slots[g] -= granularity


def _granules_up_to(slots: int, typical: int, gran: int, level: int, level_typical: int, tie: bool) -> int:
    """Granules a group at ``slots`` takes before its share ``slots / typical`` passes the
    share ``level / level_typical`` (reaching it too when ``tie``: it wins ties)."""
    num, den = level * typical - slots * level_typical, gran * level_typical
    if num < 0:
        return 0
    return -(-num // den) + (1 if tie and num % den == 0 else 0)


def _spread_leftover(slot_bytes: tuple[int, ...], typical: tuple[int, ...], quota: int, granularity: int,
                     slots: list[int]) -> None:
    """Leftover granules one at a time to the group furthest below its share (lowest
    slots / typical, ties to the lower id); a group leaves for good at the first granule it
    cannot pay for. Computed in bulk: each pass takes the longest run of that order the
    leftover pays for, then drops the group whose granule comes next (<= one pass per group)."""
    live = [g for g, d in enumerate(typical) if d > 0]
    left = quota - sum(b * s for b, s in zip(slot_bytes, slots, strict=True))

    def run(k: int, level: int) -> tuple[list[int], int]:  # granules per live group up to (level, k)
        n = [_granules_up_to(slots[g], typical[g], granularity, level, typical[k], g <= k) for g in live]
        return n, sum(slot_bytes[g] * granularity * c for g, c in zip(live, n, strict=True))

    while live:
        best: tuple[int, int] | None = None  # (group, level) of the last granule the run pays for
        for k in live:
            lo, hi = -1, left // (slot_bytes[k] * granularity)  # k's granule j ends at slots[k] + j * gran
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if run(k, slots[k] + mid * granularity)[1] <= left else (lo, mid - 1)
            level = slots[k] + lo * granularity
            if lo >= 0 and (best is None or (level * typical[best[0]], k) > (best[1] * typical[k], best[0])):
                best = (k, level)
        if best is not None:
            counts, spent = run(*best)
            for g, c in zip(live, counts, strict=True):
                slots[g] += c * granularity
            left -= spent
        live.remove(min(live, key=lambda g: (Fraction(slots[g], typical[g]), g)))  # the next granule: unpaid


def plan(
    spec: PlanSpec, *, floors: tuple[Floor, ...] | None = None, typical: tuple[int, ...] | None = None,
    spread_leftover: bool = True,
) -> PoolPlan:
    """Plan the pools for ``spec``; CapacityError if the quota cannot hold the floors.

    The keywords exist for baselines only (sim/baseline.py rebuilds a production planner that
    took its floors and its split from one request): ``floors`` and ``typical`` (slots per pool
    group) replace the guarantees and the typical step; ``spread_leftover=False`` rounds every
    count down and leaves the remainder unused. The defaults are the guaranteed planner."""
    grouped = group_layers(spec.layout, spec.tokens_per_block, spec.pools)
    n_groups = len(grouped.pool_groups)
    for name, given in (("floors", floors), ("typical", typical)):
        if given is not None and len(given) != n_groups:
            raise ConfigError(f"plan: {name} has {len(given)} entries for {n_groups} pool groups")
    if floors is None:
        floors = compute_floors(spec, grouped)
        if spec.pools == "shared" and _floor_bytes(grouped, floors) > spec.gpu_bytes:
            floors = compute_floors(spec, grouped, reserve_decodes=False)
    _check_quota(spec, grouped, floors)
    typical = typical_demand(spec, grouped) if typical is None else typical
    slot_bytes = tuple(pg.slot_bytes for pg in grouped.pool_groups)
    slots = split_slots(slot_bytes, tuple(f.min_slots for f in floors), typical,
                        spec.gpu_bytes, spec.slot_granularity, spread_leftover)
    used = sum(b * s for b, s in zip(slot_bytes, slots, strict=True))
    groups = []
    for pg, floor, n, d in zip(grouped.pool_groups, floors, slots, typical, strict=True):
        host = spec.host_bytes * n // used if used else 0  # same byte shares as the GPU
        groups.append(PoolGroupPlan(
            pg.id, tuple(grouped.layer_groups[i] for i in pg.layer_group_ids), pg.slot_bytes,
            n, floor.min_slots, floor.source, d, host,
        ))
    return PoolPlan(spec, grouped, tuple(groups))
