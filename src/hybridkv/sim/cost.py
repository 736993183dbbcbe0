"""Step-time cost model: how long one engine step of a batch would take on a named GPU.

A roofline with a fixed overhead, simple on purpose::

    step_s = max(flops / (peak_flops * mfu), bytes / (mem_bytes_per_s * mbu))
             + moved_bytes / host_link_bytes_per_s + overhead_s

    flops = 2 * active_params * tokens_in_step                       (the matmuls)
          + sum over requests of q_per_kv * query_tokens * 2 * kv_elements(context)
    bytes = weight_bytes_per_param * active_params                   (weights, read once)
          + sum over requests of live_kv_bytes(capacity)             (KV read)
          + tokens_in_step * kv_bytes_per_token + state writes       (KV written)

``live_kv_bytes(n)`` is ``report.ideal_bytes_per_request(layout, n)``: every layer keeps
exactly its live tokens (window + sinks, chunk, all, or one recurrent state), no page
rounding. Attention FLOPs: each query token multiplies every live K and V element of its
KV head by ``q_per_kv`` query heads (2 FLOPs per multiply-add), at the chunk's middle
position (``context = (history + capacity) / 2``); KV elements are taken as 2 bytes (bf16).
``moved_bytes``: pages the manager moved between GPU and host / disk in the step
(suspend / resume traffic), charged serially over ``host_link_bytes_per_s``.

What it ignores, knowingly: MoE weight reads that grow with batch size (all experts get read
at large batches: weights are underestimated there), kernel efficiency that varies with
shape, the SSM scan FLOPs (counted as parameters), communication, CPU time of the scheduler
(measured separately: ``SimResult.bookkeeping_us_per_step_p50``), and overlap of transfers.
Peak numbers: dense bf16 tensor-core FLOP/s and HBM bandwidth from the vendor data sheets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError
from hybridkv.layouts.spec import ModelLayout
from hybridkv.lifecycles import LifeCycle

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
KV_ELEMENT_BYTES = 2  # bf16 keys and values (the attention FLOP estimate only)
MAX_ACTIVE_PARAMS = 1e15  # a thousand times the largest models: step times stay finite


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """Peak dense bf16 FLOP/s and memory bandwidth (bytes/s) of one GPU."""

    name: str
    peak_flops: float
    mem_bytes_per_s: float
    host_link_bytes_per_s: float  # GPU <-> host copies (PCIe)


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("h100", 990e12, 3.35e12, 50e9),
    "h200": GpuSpec("h200", 990e12, 4.8e12, 50e9),
    "a100": GpuSpec("a100", 312e12, 2.0e12, 25e9),
}


class LiveKvBytes:
    """``ideal_bytes_per_request`` as a vectorized function of the length: the KV bytes per
    token of the layers of each life cycle (each says how many tokens it keeps live at a
    length) and the constant state bytes of recurrent layers, summed once from the layout."""

    def __init__(self, layout: ModelLayout) -> None:
        per_lc: dict[LifeCycle, int] = {}
        self.state_bytes = 0
        for layer in layout.layers:
            self.state_bytes += layer.state_bytes
            if layer.kv_bytes_per_token:
                per_lc[layer.life_cycle] = per_lc.get(layer.life_cycle, 0) + layer.kv_bytes_per_token
        self.per_lc = sorted(per_lc.items(), key=lambda kv: kv[0].describe())
        self.per_token = sum(per_lc.values())

    def attention(self, length: F64 | I64) -> F64:
        """KV bytes (token-holding layers only) live at ``length`` tokens."""
        n = np.asarray(length, np.float64)
        out = np.zeros_like(n)
        for lc, per_token in self.per_lc:
            out = out + lc.ideal_live_tokens(n) * float(per_token)
        return np.asarray(out, np.float64)

    def __call__(self, length: F64 | I64) -> F64:
        """Bytes live at ``length`` tokens: attention KV plus recurrent state."""
        n = np.asarray(length, np.float64)
        return self.attention(n) + np.where(n > 0, float(self.state_bytes), 0.0)


@dataclass(frozen=True, slots=True)
class StepCost:
    """One step's estimate and its parts (for reports and tests)."""

    seconds: float
    flops: float
    bytes: float
    moved_bytes: float


@dataclass(frozen=True)
class CostModel:
    """The roofline above for one layout on one GPU. Validated once."""

    layout: ModelLayout
    gpu: GpuSpec
    active_params: float
    mfu: float = 0.6
    mbu: float = 0.8
    overhead_s: float = 0.002
    weight_bytes_per_param: float = 2.0  # bf16
    q_per_kv: float = 4.0  # query heads per KV head (GQA); the layout does not carry it
    kv: LiveKvBytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.active_params <= MAX_ACTIVE_PARAMS:
            raise ConfigError(f"--active-params must be > 0 and <= {MAX_ACTIVE_PARAMS:g}, got {self.active_params:g}")
        if not (0 < self.mfu <= 1 and 0 < self.mbu <= 1):  # NaN fails these too
            raise ConfigError(f"mfu and mbu must be in (0, 1], got {self.mfu} and {self.mbu}")
        if not 0 <= self.overhead_s < math.inf:
            raise ConfigError(f"overhead_s must be >= 0, got {self.overhead_s}")
        object.__setattr__(self, "kv", LiveKvBytes(self.layout))  # derived once (frozen)

    def step(self, capacity: I64, history: I64, moved_bytes: float = 0.0) -> StepCost:
        """Cost of a step that moves each request from ``history`` to ``capacity`` tokens."""
        busy = capacity > history
        c, h = capacity[busy], history[busy]
        q = (c - h).astype(np.float64)
        tokens = float(q.sum())
        mid = (c + h) / 2.0
        attn_flops = float((self.q_per_kv * q * 2.0 * self.kv.attention(mid) / KV_ELEMENT_BYTES).sum())
        flops = 2.0 * self.active_params * tokens + attn_flops
        kv_read = float(self.kv(c).sum())
        kv_written = tokens * self.kv.per_token + self.kv.state_bytes * float(c.size)
        nbytes = self.weight_bytes_per_param * self.active_params + kv_read + kv_written
        if c.size == 0:
            nbytes = 0.0  # nothing ran: no weights read
        seconds = max(flops / (self.gpu.peak_flops * self.mfu), nbytes / (self.gpu.mem_bytes_per_s * self.mbu))
        seconds += moved_bytes / self.gpu.host_link_bytes_per_s + (self.overhead_s if c.size else 0.0)
        return StepCost(seconds, flops, nbytes, moved_bytes)
