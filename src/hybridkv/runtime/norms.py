"""Fused RMSNorm for the engine on a GPU: each norm module whose output a one-launch Triton
kernel (``engine/triton_norm.py``) reproduces runs through that kernel instead.

Which form a norm class computes is not guessed from its name: the first module of each
class ending in ``RMSNorm`` is run, with a random weight, against every form of the kernel,
and the form closest to the module's own output is installed if it is within rounding
(float32: 1e-5; half types: 2e-2 on values of a few units, where forms that disagree differ
by whole units). A class no form reproduces (a gated norm, one with a bias, another formula)
keeps its own forward, and ``install`` says so.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from hybridkv.engine.triton_norm import rms_norm_triton

if TYPE_CHECKING:
    import torch

_CANDIDATES = (("offset", 1.0), ("cast", 0.0), ("offset", 0.0))


def _eps(module: Any) -> float | None:
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    return float(eps) if isinstance(eps, float | int) else None


def _form(module: Any, eps: float) -> tuple[str, float] | str:
    """The kernel form reproducing ``module`` (its own forward, original if already fused), or why none."""
    import torch

    weight = module.weight
    g = torch.Generator(device="cpu").manual_seed(0)
    n = weight.shape[0]
    x = (torch.randn(3, n, generator=g) * 3).to(device=weight.device, dtype=weight.dtype)
    w = (torch.randn(n, generator=g) * 0.5).to(device=weight.device, dtype=weight.dtype)
    forward = getattr(module, "hybridkv_original_forward", None) or module.forward  # (an earlier engine fused it)
    with torch.no_grad():
        saved = module.weight.data
        try:
            module.weight.data = w
            want = forward(x)
        except Exception as e:  # a forward that takes more than the hidden states (gated norms)
            return f"its forward does not take one tensor ({type(e).__name__})"
        finally:
            module.weight.data = saved
        if not isinstance(want, torch.Tensor) or want.shape != x.shape or want.dtype != x.dtype:
            return "its output is not a tensor shaped and typed like its input"
        tol = 1e-5 if x.dtype == torch.float32 else 2e-2
        best: tuple[float, tuple[str, float]] | None = None
        for form, offset in _CANDIDATES:
            err = float((rms_norm_triton(x, w, eps, form, offset).float() - want.float()).abs().max())
            if err <= tol * (1.0 + float(want.float().abs().max())) and (best is None or err < best[0]):
                best = (err, (form, offset))
    return best[1] if best is not None else "no fused form reproduces its output"


def _fused_forward(module: Any, eps: float, form: str, offset: float, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm_triton(hidden_states, module.weight, eps, form, offset)


def install(model: Any) -> dict[str, str]:
    """Fuse every RMSNorm module of ``model`` that a kernel form reproduces; per norm class,
    the form installed or why it kept its own forward."""
    import torch

    decided: dict[type, tuple[str, float] | str] = {}
    for module in model.modules():
        cls = type(module)
        weight = getattr(module, "weight", None)
        eps = _eps(module)
        if not cls.__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or weight.dim() != 1 \
                or eps is None or getattr(module, "bias", None) is not None:
            continue
        if cls not in decided:
            decided[cls] = _form(module, eps)
        choice = decided[cls]
        if isinstance(choice, str):
            continue
        if getattr(module, "hybridkv_original_forward", None) is None:
            module.hybridkv_original_forward = module.forward
        module.forward = functools.partial(_fused_forward, module, eps, *choice)
    return {cls.__name__: c if isinstance(c, str) else f"{c[0]} {c[1]:g}" for cls, c in decided.items()}


def uninstall(model: Any) -> int:
    """Give every fused norm module of ``model`` its own forward back; how many were fused."""
    restored = 0
    for module in model.modules():
        original = getattr(module, "hybridkv_original_forward", None)
        if original is not None and isinstance(module.forward, functools.partial) \
                and module.forward.func is _fused_forward:
            module.forward = original
            restored += 1
    return restored
