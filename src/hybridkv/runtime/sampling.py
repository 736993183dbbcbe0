"""Temperature sampling of a whole batch on the logits' device, seeded per request.

A request's token at position ``p`` is drawn by inverting its distribution's CDF::

    cdf = cumsum(softmax(logits / T))          over the vocabulary, float64
    token = the first v with  u(seed, p) * cdf[-1] <= cdf[v]

with one uniform ``u`` per row, a counter-based hash of ``(seed, p)`` rather than a
generator's stream. So a request's draws depend only on its seed, its positions and its
logits: not on the batch it shares a step with, on which rows are greedy, or on whether it was
preempted and recomputed (on another device, only where rounding moves a CDF boundary past
``u``). One batch of tensor operations serves every sampled row; only the tokens reach the host.

The hash is Wellons' 32-bit ``lowbias32`` mixer, computed in int64 with each 32 x 32-bit
product split into 16-bit halves so nothing overflows (identical on every device); two of
its outputs give ``u`` 53 bits.

``StepSampler`` picks a whole step's tokens (greedy and sampled rows) and starts their way to
the host (``SampledStep``) without waiting for the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from hybridkv.runtime.packing import HostStep
    from hybridkv.runtime.requests import GenRequest

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a 32-bit avalanche hash of int64 values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[R]`` float64 in (0, 1): the hash of (seed, position) per row (seeds 0 .. 2**63 - 1)."""
    import torch

    k = mix32((seeds & _M32) ^ mix32((seeds >> 32) ^ mix32((positions & _M32) ^ _GOLDEN)))
    k2 = mix32(k ^ 0x85EBCA6B)
    bits = (k << 21) | (k2 >> 11)  # 53 bits
    return (bits.to(torch.float64) + 0.5) * (1.0 / (1 << 53))


def sample(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
           positions: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` ``[R, V]``: row ``r`` drawn from
    ``softmax(logits[r] / temperatures[r])`` by the uniform of ``(seeds[r], positions[r])``
    (all three ``[R]``, on the logits' device; temperatures > 0). ``[R]`` int64."""
    import torch

    probs = torch.softmax(logits.float() / temperatures.float()[:, None], dim=-1)
    cdf = probs.double().cumsum(dim=-1)
    u = uniforms(seeds, positions) * cdf[:, -1]
    token = torch.searchsorted(cdf, u[:, None]).squeeze(1)
    return token.clamp(max=logits.shape[-1] - 1)


class SampledStep:
    """One step's sampled tokens (``[E]`` on the device) on their way to the host: a copy into
    page-locked memory and an event on a GPU, so ``read`` waits for this step only, not for a
    step launched after it."""

    def __init__(self, requests: tuple[GenRequest, ...], tokens: torch.Tensor, logits: torch.Tensor | None,
                 host: torch.Tensor | None, done: Any) -> None:
        self.requests, self.tokens, self.logits, self.host, self.done = requests, tokens, logits, host, done
        self.index = {r.request_id: j for j, r in enumerate(requests)}  # where each request's token is

    def read(self) -> list[int]:
        if self.done is None:
            return list(self.tokens.tolist())
        self.done.synchronize()
        assert self.host is not None
        return list(self.host[:len(self.requests)].tolist())


class StepSampler:
    """Picks a step's tokens on the logits' device: greedy rows by one argmax over the batch,
    sampling rows by one batched draw (``sample``). The tokens also go to ``last``, a fixed
    buffer the next step reads its pending inputs from (a replayed graph reads fixed
    addresses), and to one of two page-locked host buffers, taken in turn: a step's copy
    lands while the host still reads the step before."""

    def __init__(self, max_rows: int, device: str, keep_logits: bool) -> None:
        import torch

        self.device, self.keep_logits = torch.device(device), keep_logits
        self.last = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.cuda = self.device.type == "cuda"
        self.host = [torch.zeros(max_rows, dtype=torch.long, pin_memory=True) for _ in range(2)] if self.cuda else []
        self.turn = 0

    def __call__(self, host: HostStep, logits: torch.Tensor) -> SampledStep:
        """Sample ``host.emitting``'s tokens from ``logits`` ``[E, vocab]`` (read it before the
        next step: a graph's output is reused) and reserve their places."""
        import torch

        from hybridkv.runtime.packing import to_device

        reqs = host.emitting
        chosen = logits.argmax(dim=-1)
        drawn = [j for j, r in enumerate(reqs) if r.temperature > 0.0]
        if drawn:  # one batched draw for every sampling row, on the logits' device
            ints = np.array([drawn, [reqs[j].seed for j in drawn], host.emit_positions[drawn].tolist()], np.int64)
            ints_dev = to_device(ints, logits.device)
            temps = to_device(np.array([reqs[j].temperature for j in drawn], np.float32), logits.device)
            chosen[ints_dev[0]] = sample(logits[ints_dev[0]], temps, ints_dev[1], ints_dev[2])
        n = len(reqs)
        self.last[:n].copy_(chosen)
        kept = logits.to(torch.float32, copy=True) if self.keep_logits else None
        out, done = None, None
        if self.cuda:
            out, self.turn = self.host[self.turn], 1 - self.turn
            out[:n].copy_(chosen, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        for r in reqs:
            r.reserve()
        return SampledStep(reqs, chosen, kept, out, done)
