"""RMSNorm in one Triton launch: the fused replacement of transformers' norm modules on a GPU.

transformers' RMSNorm modules compute in float32 with one kernel per operation (convert, square,
mean, add, rsqrt, multiply, weight, convert back): about seven launches for each of a
Gemma-3 decoder layer's six norms. On an H200 those small kernels were half of a replayed
decode step of a 1B model (``benchmarks/profile_engine.py``). One program per row here::

    y = x * rsqrt(mean(x^2) + eps)         in float32
    "offset": y * (offset + w)              Gemma (offset 1) and Qwen3-Next, weight in float32
    "cast":   w * dtype(y)                  Llama-style: the weight multiplies the cast result

``runtime/norms.py`` decides per module which form reproduces it, by running both against
the module's own forward, and installs only a match.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hybridkv.core.errors import UsageError
from hybridkv.engine.triton_attention import triton_available

if TYPE_CHECKING:
    import torch

if triton_available():  # optional, as for the attention kernel
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]
    def _rms_norm(x, w, out, n, sx, so, eps, offset,  # type: ignore[no-untyped-def]
                  BLOCK: tl.constexpr, CAST_FIRST: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        m = c < n
        v = tl.load(x + row * sx + c, mask=m, other=0.0).to(tl.float32)
        y = v * tl.rsqrt(tl.sum(v * v, axis=0) / n + eps)
        wt = tl.load(w + c, mask=m, other=0.0).to(tl.float32)
        if CAST_FIRST:
            y = y.to(out.dtype.element_ty).to(tl.float32) * wt
        else:
            y = y * (offset + wt)
        tl.store(out + row * so + c, y.to(out.dtype.element_ty), mask=m)


FORMS = ("offset", "cast")


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, form: str, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dim (``form``: "offset" or "cast", above), in x's dtype."""
    if not triton_available():
        raise UsageError("rms_norm_triton needs triton (pip install 'hybridkv[triton]')")
    if form not in FORMS or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise UsageError(f"rms_norm_triton: form one of {FORMS} (got {form!r}), a 1-d weight as long as x's last "
                         f"dim (got weight {tuple(weight.shape)}, x {tuple(x.shape)})")
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    out = x.new_empty(rows.shape)
    if rows.shape[0]:
        block = max(16, 1 << max(0, n - 1).bit_length())
        _rms_norm[(rows.shape[0],)](rows, weight, out, n, rows.stride(0), out.stride(0), eps, offset, BLOCK=block,
                                    CAST_FIRST=form == "cast", num_warps=8 if block > 1024 else 4)
    return out.view(x.shape)
