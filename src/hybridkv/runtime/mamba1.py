"""Mamba-1's selective scan continued from a state (Jamba's mixers).

transformers runs a Mamba-1 mixer's multi-token pass through its modeling module's
``mamba_selective_scan``, which starts from a zero state whatever the cache holds (the CUDA
kernels it mirrors take no initial state; ``generate`` continues a state one token at a time).
A prefill chunk after the first, a prefix hit or a fork continues a state, so ``install``
wraps that function: while ``continuing(state)`` is active, the scan runs the recurrence from
``state``; otherwise the module's own scan runs. Per channel ``d`` and state entry ``n``::

    h_t = exp(A[d, n] dt_t[d]) h_{t-1} + dt_t[d] B_t[n] x_t[d]      (float32)
    y_t[d] = sum_n C_t[n] h_t[d, n]  (+ D[d] x_t[d], then times silu(z_t[d]))

with ``dt`` through its bias and softplus first, as the module asks. The convolution state
already continues through the cache (``recurrent.OneRequestCache.update_conv_state``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FUNCTION = "mamba_selective_scan"
_START: ContextVar[Any] = ContextVar("hybridkv_mamba1_start", default=None)


@contextlib.contextmanager
def continuing(state: torch.Tensor | None) -> Iterator[None]:
    """Scans inside start from ``state`` ``[batch, channels, state size]`` (None: from zero,
    the module's own scan)."""
    token = _START.set(state)
    try:
        yield
    finally:
        _START.reset(token)


def scan_from(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
              delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
              return_last_state: bool = False) -> Any:
    """The selective scan from ``state``, in the kernel's layout: ``x``, ``dt``, ``z``
    ``[batch, channels, T]``, ``A`` ``[channels, n]``, ``B``, ``C`` ``[batch, n, T]``."""
    import torch

    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = torch.nn.functional.softplus(dt)
    decay = torch.exp(A[None, :, None, :] * dt[..., None])  # [batch, channels, T, n]
    drive = dt[..., None] * B.transpose(1, 2)[:, None].float() * x[..., None].float()
    h = state.float()
    ys = []
    for t in range(x.shape[-1]):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append(torch.matmul(h.to(x.dtype), C[:, :, t, None])[..., 0])
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + x * D[None, :, None]
    if z is not None:
        y = y * torch.nn.functional.silu(z)
    return (y, h) if return_last_state else y


def _scan(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    state = _START.get()
    if state is None:
        return original(*args, **kwargs)
    names = ("x", "dt", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state")
    given = dict(zip(names, args, strict=False))
    given.update({k: v for k, v in kwargs.items() if k in names})
    if "hidden_states" in kwargs:
        given["x"] = kwargs["hidden_states"]
    return scan_from(state, **given)


def install(module: Any) -> bool:
    """Wrap the scan of ``module``'s modeling module (once); whether it has one."""
    import functools

    source = sys.modules.get(type(module).__module__)
    original = getattr(source, FUNCTION, None)
    if source is None or original is None:
        return False
    if not getattr(original, "hybridkv_continues", False):
        wrapped = functools.partial(_scan, original)
        wrapped.hybridkv_continues = True  # type: ignore[attr-defined]
        setattr(source, FUNCTION, wrapped)
    return True
