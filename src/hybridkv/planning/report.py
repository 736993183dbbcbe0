"""Reports on a plan, all through the demand function: how many requests of a length fit,
the longest length a batch can reach, the ideal (no rounding, no floors) concurrency, and
the JSON form the CLI prints."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from hybridkv.layouts.spec import ModelLayout
from hybridkv.planning.demand import worst_request_demand
from hybridkv.planning.planner import PoolGroupPlan, PoolPlan

_UNBOUNDED_TOKENS = 1 << 40


@dataclass(frozen=True, slots=True)
class Concurrency:
    """How many requests of ``length`` tokens fit at once, and which pool group binds."""

    length: int
    requests: float  # fractional: slots / per-request worst-case slots, minimum over groups
    binding_pool_group: int | None  # None when no group limits it

    @property
    def whole_requests(self) -> int:
        return math.floor(self.requests) if math.isfinite(self.requests) else -1


def max_concurrency(plan: PoolPlan, length: int) -> Concurrency:
    """Requests of up to ``length`` tokens that can decode at once at worst-case positions."""
    per_request = worst_request_demand(plan.grouped, length)
    best, binding = math.inf, None
    for pg, need in zip(plan.pool_groups, per_request, strict=True):
        if need and pg.slots / need < best:
            best, binding = pg.slots / need, int(pg.id)
    return Concurrency(length, best, binding)


def fits_batch(plan: PoolPlan, batch_size: int, length: int) -> bool:
    """Whether ``batch_size`` requests can all decode to ``length`` tokens at once."""
    need = worst_request_demand(plan.grouped, length)
    return all(batch_size * n <= pg.slots for n, pg in zip(need, plan.pool_groups, strict=True))


def max_seq_len_at(plan: PoolPlan, batch_size: int) -> int | None:
    """Longest length ``batch_size`` requests can all reach together; None if unbounded
    (no pool group grows with length) and 0 if not even one token each fits."""
    if fits_batch(plan, batch_size, _UNBOUNDED_TOKENS):
        return None
    hi = _UNBOUNDED_TOKENS
    for pg in plan.pool_groups:  # a group growing with length needs >= ceil(L / tpb) slots per request
        if not all(lg.life_cycle.is_bounded_below(_UNBOUNDED_TOKENS) for lg in pg.layer_groups):
            hi = min(hi, (pg.slots // batch_size + 1) * plan.spec.tokens_per_block + 1)
    lo = 0  # fits(lo): 0 tokens need nothing; not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits_batch(plan, batch_size, mid) else (lo, mid)
    return lo


LayerKinds = list[tuple[Any, int, int, int]]  # (life cycle, K/V bytes per token, state bytes, layers)


def layer_kinds(layout: ModelLayout) -> LayerKinds:
    """The layout's layers counted by what a request's bytes depend on: a model of thousands
    of layers has a handful of kinds, so a search over lengths reads each kind, not each layer."""
    counts = Counter((layer.life_cycle, layer.kv_bytes_per_token, layer.state_bytes) for layer in layout.layers)
    return [(lc, kv, state, n) for (lc, kv, state), n in counts.items()]


def _ideal_bytes(kinds: LayerKinds, length: int) -> int:
    return sum(n * (kv * int(lc.ideal_live_tokens(length)) + state) for lc, kv, state, n in kinds)


def ideal_bytes_per_request(layout: ModelLayout, length: int) -> int:
    """Bytes one request of ``length`` tokens holds if every layer keeps exactly its live
    tokens (window + sinks, chunk, all, or one state): no pages, no rounding."""
    return _ideal_bytes(layer_kinds(layout), length)


def ideal_concurrency(layout: ModelLayout, gpu_bytes: int, length: int) -> float:
    return gpu_bytes / ideal_bytes_per_request(layout, length)


def ideal_max_seq_len_at(layout: ModelLayout, gpu_bytes: int, batch_size: int) -> int | None:
    """Longest length ``batch_size`` requests reach together if every layer held exactly its
    live tokens in ``gpu_bytes`` (no pages, no floors); None if unbounded."""
    kinds = layer_kinds(layout)
    if batch_size * _ideal_bytes(kinds, _UNBOUNDED_TOKENS) <= gpu_bytes:
        return None
    lo, hi = 0, _UNBOUNDED_TOKENS
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if batch_size * _ideal_bytes(kinds, mid) <= gpu_bytes else (lo, mid)
    return lo


def _pool_group_json(pg: PoolGroupPlan) -> dict[str, Any]:
    lcs = [lg.life_cycle for lg in pg.layer_groups]
    kinds = {"attention" if lc.per_token else "ssm" for lc in lcs}
    spans = [lc.span_tokens() for lc in lcs if lc.per_token]
    return {
        "id": int(pg.id),
        "kind": kinds.pop() if len(kinds) == 1 else "mixed",
        # one window per pool group: the widest of its layer groups, null if any is full
        "window": None if not spans or None in spans else max(s for s in spans if s is not None),
        "sink_tokens": max(lc.sink_tokens for lc in lcs),
        "layer_ids": list(pg.layer_ids),
        "slot_bytes": pg.slot_bytes,
        "slots": pg.slots,
        "min_slots": pg.min_slots,
        "floor_source": pg.floor_source,
        "bytes": pg.bytes,
        "host_slots": pg.host_slots,
        "typical_demand": pg.typical_demand,
        "layer_groups": [
            {"id": int(lg.id), "life_cycle": lg.life_cycle.describe(),
             "window": lg.life_cycle.window_tokens, "chunk": lg.life_cycle.chunk_tokens,
             "sink_tokens": lg.life_cycle.sink_tokens, "layer_ids": list(lg.layer_ids),
             "slot_bytes": lg.slot_bytes, "used_bytes": lg.used_bytes,
             "state_slice": None if lg.state_slice is None else list(lg.state_slice)}
            for lg in pg.layer_groups
        ],
    }


def plan_json(plan: PoolPlan) -> dict[str, Any]:
    """The object ``hybridkv plan --json`` prints."""
    spec = plan.spec
    conc = max_concurrency(plan, spec.max_seq_len)
    ideal = ideal_concurrency(spec.layout, spec.gpu_bytes, spec.max_seq_len)
    return {
        "model": spec.layout.name,
        "tokens_per_block": spec.tokens_per_block,
        "max_batch_size": spec.max_batch_size,
        "max_seq_len": spec.max_seq_len,
        "gpu_bytes": spec.gpu_bytes,
        "gpu_bytes_used": plan.gpu_bytes_used,
        "host_bytes": spec.host_bytes,
        "max_concurrency_at_max_seq_len": round(conc.requests, 4),
        "binding_pool_group": conc.binding_pool_group,
        "ideal_concurrency_at_max_seq_len": round(ideal, 4),
        "concurrency_ratio_to_ideal": round(conc.requests / ideal, 4),
        "max_seq_len_at_max_batch_size": max_seq_len_at(plan, spec.max_batch_size),
        "ideal_max_seq_len_at_max_batch_size": ideal_max_seq_len_at(spec.layout, spec.gpu_bytes,
                                                                    spec.max_batch_size),
        "pools_mode": plan.grouped.pools_mode,
        "page_bytes": plan.grouped.page_bytes,
        "padding_bytes": plan.grouped.padding_bytes,
        "tables_per_step": len(plan.grouped.layer_groups),
        # layer groups of one life cycle in one pool keep their tables in one array
        "families": len({(lg.life_cycle, lg.pool_group) for lg in plan.grouped.layer_groups}),
        "own_pools": list(plan.grouped.own_pools),
        "constraints": [c.name for c in spec.constraints],
        "typical_step": spec.typical_name(),
        "unverified": list(spec.layout.unverified),
        "pool_groups": [_pool_group_json(pg) for pg in plan.pool_groups],
    }
