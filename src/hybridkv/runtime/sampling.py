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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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
