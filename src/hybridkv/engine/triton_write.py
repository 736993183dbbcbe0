"""Writing a step's keys and values into their pages in one Triton launch, with no host sync.

The contract of the torch ``write_kv`` (``engine/paged_attention.py``), except for holes:
a token whose block has no page (slot ``-1``) is skipped instead of raising, because
checking would read the device. That is what a padded decode step needs: its padding
tokens sit in a row whose table is all ``-1``, so one captured CUDA graph serves every
batch up to its size (``runtime/graphs.py``). One program per token writes its
``Hkv x D`` keys and ``Hkv x Dv`` values through the pages' strides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from hybridkv.core.errors import UsageError
from hybridkv.engine.paged_attention import write_kv
from hybridkv.engine.triton_attention import triton_available, triton_runs_on

if TYPE_CHECKING:
    import torch

if triton_available():  # optional, as for the attention kernel
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]
    def _write(cache, new, block_table, q_row, q_pos, tpb, heads, dim,  # type: ignore[no-untyped-def]
               sc_s, sc_t, sc_h, sc_d, sn_t, sn_h, sn_d, sb_r, sb_w, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        row = tl.load(q_row + t)
        pos = tl.load(q_pos + t)
        slot = tl.load(block_table + row * sb_r + (pos // tpb) * sb_w).to(tl.int64)
        i = tl.arange(0, BLOCK)
        h, d = i // dim, i % dim
        keep = (i < heads * dim) & (slot >= 0)
        x = tl.load(new + t * sn_t + h * sn_h + d * sn_d, mask=keep)
        tl.store(cache + slot * sc_s + (pos % tpb) * sc_t + h * sc_h + d * sc_d, x.to(cache.dtype.element_ty),
                 mask=keep)


def _launch(cache: torch.Tensor, new: torch.Tensor, block_table: torch.Tensor, rows: torch.Tensor,
            positions: torch.Tensor) -> None:
    heads, dim = new.shape[1], new.shape[2]
    block = 1 << max(0, heads * dim - 1).bit_length()
    _write[(new.shape[0],)](cache, new, block_table, rows, positions, cache.shape[1], heads, dim, *cache.stride(),
                            *new.stride(), *block_table.stride(), BLOCK=max(16, block))


def write_kv_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, rows: torch.Tensor,
                    positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Scatter ``k`` ``[T, Hkv, D]`` and ``v`` ``[T, Hkv, Dv]`` into their pages (row
    ``rows[t]``, position ``positions[t]``); a token with no page is skipped."""
    if not triton_available():
        raise UsageError("write_kv_triton needs triton (pip install 'hybridkv[triton]'); without it use "
                         "hybridkv.engine.paged_attention.write_kv")
    t = k.shape[0]
    if k.dim() != 3 or v.dim() != 3 or v.shape[:2] != k.shape[:2] or rows.shape != (t,) \
            or positions.shape != (t,) or k.shape[1:] != k_cache.shape[2:] or v.shape[1:] != v_cache.shape[2:]:
        raise UsageError(f"write_kv_triton: k [T, Hkv, D] and v [T, Hkv, Dv] must match their caches' last two "
                         f"dims, rows and positions one entry per token (got k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}, caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}, rows "
                         f"{tuple(rows.shape)}, positions {tuple(positions.shape)})")
    if t == 0:
        return
    _launch(k_cache, k, block_table, rows, positions)
    if v_cache.data_ptr() != k_cache.data_ptr() or v_cache.stride() != k_cache.stride() \
            or v.data_ptr() != k.data_ptr():  # MLA: V is the latent's first channels, already written
        _launch(v_cache, v, block_table, rows, positions)


def write_kv_skipping_holes(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                            rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The torch ``write_kv`` that skips tokens with no page (what the Triton one does);
    it reads the device once to find them, so it is the CPU path."""
    slots = block_table.long()[rows, positions // k_cache.shape[1]]
    keep = slots >= 0
    write_kv(k_cache, v_cache, block_table, rows[keep], positions[keep], k[keep], v[keep])


WriteKV = Callable[..., None]  # the signature of write_kv


def pick_write_kv(device: torch.device, *, skip_holes: bool = False) -> WriteKV:
    """The Triton write on a CUDA device with triton (or under ``TRITON_INTERPRET=1``), which
    skips holes and never syncs; else the torch ``write_kv``, which raises on a hole
    (``skip_holes``: the torch one that skips them)."""
    if triton_runs_on(device):
        return write_kv_triton
    return write_kv_skipping_holes if skip_holes else write_kv
