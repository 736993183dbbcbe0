"""Paged attention in Triton: the GPU path for decode and prefill chunks in one launch.

Same contract as the torch reference (``hybridkv.engine.paged_attention``): packed queries
``[T, Hq, D]``, one layer's pages read through their strides (slot-major pool views, never
copied), a block table per row with ``-1`` where a row holds no page.

One program per (group of query tokens of one row, KV head, split). The query heads of a KV
head travel together so each K / V tile is loaded once for all of them (GQA; MLA is the
``Hkv == 1`` case). A program visits only the key tiles its mask can reach::

    keys   0 ........ S-1 | ........ stale ........ | lo .......... p_max |
           [ sink tiles ] |   never loaded           [ window / chunk tiles ]

with ``lo`` the first key the group's earliest query sees (window start or chunk start).
Inside a tile a key is loaded only when some query of the group sees it, so a ``-1`` slot, a
stale page or a page past ``kv_len`` is never read. Online softmax in fp32 (base 2). When
there are too few (group, head) programs to fill the GPU, the tiles are cut into splits along
the keys (flash-decoding) and a second kernel merges the partial softmaxes.

Triton is optional: this module imports without it (and without CUDA);
``paged_attention_triton`` then raises ``UsageError`` and ``pick_paged_attention`` returns the
torch reference.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybridkv.core.errors import UsageError

if TYPE_CHECKING:
    import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the torch reference serves without it
    triton = None

def triton_available() -> bool:
    """Was Triton importable? (It still needs a CUDA device or ``TRITON_INTERPRET=1``.)"""
    return triton is not None


def triton_runs_on(device: torch.device) -> bool:
    """Can the Triton kernels run for tensors on ``device``: triton installed, and a CUDA
    device or ``TRITON_INTERPRET=1`` (the interpreter, on the CPU)?"""
    return triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


@dataclass(frozen=True, slots=True)
class KernelTiles:
    """How one launch is cut. A named object so a benchmark can sweep the cut that
    ``choose_tiles`` would pick, through the same launch code."""

    block_q: int  # query tokens of one row per program (1 for decode)
    block_n: int  # keys per tile
    num_splits: int  # programs per (query group, KV head) along the keys; > 1 adds a merge kernel
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_q", "block_n"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise UsageError(f"KernelTiles.{name} must be a power of two >= 1, got {value}")
        if self.block_n < 16 or not 1 <= self.num_splits <= 64:
            raise UsageError(f"KernelTiles: block_n >= 16 (got {self.block_n}) and 1 <= num_splits <= 64 "
                             f"(got {self.num_splits})")


def choose_tiles(num_tokens: int, num_rows: int, visible_tokens: int, q_per_kv: int, num_kv_heads: int,
                 head_dim: int, value_dim: int, num_sms: int) -> KernelTiles:
    """The default cut, from shapes only (no device sync). ``visible_tokens``: the most keys
    one query can see (the table's width in tokens, or less under a window or chunk).

    One query per program for decode, ``~32 / q_per_kv`` for prefill chunks; 64-key tiles,
    4 warps; splits along the keys up to about two programs per SM, at least one tile each.
    (Measured on an H200 at a Gemma-3-1B layer, batch 32-256, 2k-8k context: 8 warps or
    four programs per SM were slower; see benchmarks/bench_attention.py --sweep.)"""
    decode = num_tokens <= num_rows
    block_q = 1 if decode else max(1, 32 // _pow2(q_per_kv))
    block_n = 32 if max(head_dim, value_dim) > 256 else 64
    groups = num_tokens if decode else max(num_rows, -(-num_tokens // block_q))
    splits = min(2 * num_sms // max(1, groups * num_kv_heads), -(-visible_tokens // block_n), 16)
    return KernelTiles(block_q, block_n, max(1, splits))


@functools.cache
def _num_sms(device: int) -> int:
    import torch

    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def default_tiles(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                  window: int | None, sink_tokens: int, chunk: int | None) -> KernelTiles:
    """``choose_tiles`` for these arguments, as ``paged_attention_triton`` calls it."""
    import torch

    visible = block_table.shape[1] * k_cache.shape[1]
    if window is not None:
        visible = min(visible, window + sink_tokens)
    if chunk is not None:
        visible = min(visible, chunk)
    num_sms = _num_sms(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
        if q.is_cuda else 4
    return choose_tiles(q.shape[0], block_table.shape[0], visible, q.shape[1] // k_cache.shape[2],
                        k_cache.shape[2], q.shape[2], v_cache.shape[3], num_sms)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


if triton is not None:  # the kernels; ``triton.jit`` reads TRITON_INTERPRET here, at import
    @triton.jit  # type: ignore[untyped-decorator]
    def _tile(m_i, l_i, acc, q0, start, row, seen, p_m, live, token, head, kvh,  # type: ignore[no-untyped-def]
             q, k_cache, v_cache, block_table, sq_t, sq_h, sq_d, sk_s, sk_t, sk_h, sk_d, sv_s, sv_t, sv_h, sv_d,
             sb_r, sb_w, width, head_dim, value_dim, scale, softcap, window, sink_tokens, chunk,
             TPB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
             BLOCK_DV: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
        j = start + tl.arange(0, BLOCK_N)
        in_table = (j < seen) & (j // TPB < width)
        slot = tl.load(block_table + row * sb_r + (j // TPB) * sb_w, mask=in_table, other=-1).to(tl.int64)
        vis = (j[None, :] <= p_m[:, None]) & live[:, None] & (in_table & (slot >= 0))[None, :]
        if HAS_WINDOW:
            vis = vis & (((p_m[:, None] - j[None, :]) < window) | (j[None, :] < sink_tokens))
        if HAS_CHUNK:
            vis = vis & ((j[None, :] // chunk) == (p_m[:, None] // chunk))
        needed = tl.max(vis.to(tl.int32), axis=0) > 0  # load a key only if some query sees it
        k_row = k_cache + slot * sk_s + (j % TPB) * sk_t + kvh * sk_h
        s = tl.zeros([p_m.shape[0], BLOCK_N], dtype=tl.float32)
        for c in tl.static_range(NUM_DK):
            d = c * BLOCK_DK + tl.arange(0, BLOCK_DK)
            if c == 0:
                qc = q0
            else:
                qc = tl.load(q + token[:, None] * sq_t + head[:, None] * sq_h + d[None, :] * sq_d,
                             mask=live[:, None] & (d < head_dim)[None, :], other=0.0)
            kc = tl.load(k_row[:, None] + d[None, :] * sk_d, mask=needed[:, None] & (d < head_dim)[None, :],
                         other=0.0)
            if IEEE:
                s += tl.dot(qc, tl.trans(kc), input_precision="ieee")
            else:
                s += tl.dot(qc, tl.trans(kc))
        s = s * scale
        if HAS_SOFTCAP:  # softcap * tanh(s / softcap), tanh from exp2 (saturates cleanly at +-1)
            s = softcap * (1.0 - 2.0 / (tl.exp2(s * (2.0 * 1.4426950408889634 / softcap)) + 1.0))
        s = tl.where(vis, s * 1.4426950408889634, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        dv = tl.arange(0, BLOCK_DV)
        v = tl.load(v_cache + (slot * sv_s + (j % TPB) * sv_t + kvh * sv_h)[:, None] + dv[None, :] * sv_d,
                    mask=needed[:, None] & (dv < value_dim)[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i * alpha + tl.sum(p, axis=1), acc

    @triton.jit  # type: ignore[untyped-decorator]
    def _attention(q, k_cache, v_cache, out, part, block_table, q_row, q_pos,  # type: ignore[no-untyped-def]
                  kv_len, group_len, sinks, num_tokens, num_q_heads,
                  sq_t, sq_h, sq_d, sk_s, sk_t, sk_h, sk_d, sv_s, sv_t, sv_h, sv_d, so_t, so_h, so_d, sb_r, sb_w,
                  width, head_dim, value_dim, q_per_kv, scale, softcap, window, sink_tokens, chunk,
                  TPB: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HAS_SINKS: tl.constexpr, IEEE: tl.constexpr):
        t0, split = tl.program_id(0), tl.program_id(2)
        kvh = tl.program_id(1) // tl.cdiv(q_per_kv, BLOCK_H)  # axis 1: (KV head, chunk of its query heads)
        h0 = (tl.program_id(1) % tl.cdiv(q_per_kv, BLOCK_H)) * BLOCK_H
        if BLOCK_Q == 1:  # decode: every token is its own group
            n_q = 1
        else:  # 0: token t0 is not the first of its group, nothing to do
            n_q = tl.load(group_len + t0)
        m = tl.arange(0, BLOCK_Q * BLOCK_H)  # rows: (query of the group, query head of this KV head)
        live = (m // BLOCK_H < n_q) & (h0 + m % BLOCK_H < q_per_kv)
        token = (t0 + m // BLOCK_H).to(tl.int64)  # int64: offsets like token * stride may pass 2**31
        head = kvh * q_per_kv + h0 + m % BLOCK_H
        p_m = tl.load(q_pos + token, mask=live, other=0)
        p_lo = tl.min(tl.where(live, p_m, 1 << 30), axis=0)
        p_hi = tl.max(tl.where(live, p_m, -1), axis=0)
        row = tl.load(q_row + t0)
        seen = tl.load(kv_len + row)
        # key ranges of the group: sinks [c_lo, s_hi), then the window / chunk [lo, p_hi]
        c_lo = p_lo * 0
        if HAS_CHUNK:
            c_lo = (p_lo // chunk) * chunk
        lo = c_lo
        s_hi = c_lo
        if HAS_WINDOW:
            lo = tl.maximum(lo, p_lo - window + 1)
            s_hi = tl.maximum(tl.minimum(lo, sink_tokens), c_lo)
        s0 = (c_lo // BLOCK_N) * BLOCK_N
        n_sink = tl.cdiv(s_hi - s0, BLOCK_N) * (s_hi > c_lo).to(tl.int32)  # (scalar where is not portable)
        m0 = tl.maximum((lo // BLOCK_N) * BLOCK_N, s0 + n_sink * BLOCK_N)
        n_main = tl.cdiv(tl.maximum(tl.minimum(p_hi + 1, seen) - m0, 0), BLOCK_N)
        per_split = tl.cdiv(n_sink + n_main, NUM_SPLITS)
        i_lo = split * per_split
        i_hi = tl.minimum(i_lo + per_split, n_sink + n_main)
        # (1.4426950408889634 = log2(e): logits in base 2. The running max starts at -1e30, not
        # -inf, so exp2(m_old - m_new) never meets inf - inf.)
        if HAS_SINKS:  # the sink column: logit sinks[h], weight 1, no value; counted by split 0 only
            sink = tl.load(sinks + head, mask=live, other=0.0).to(tl.float32) * 1.4426950408889634
            m_i = tl.where(split == 0, sink, -1.0e30)
            l_i = tl.where(split == 0, 1.0, 0.0) + tl.zeros_like(sink)
        else:
            m_i = tl.full([BLOCK_Q * BLOCK_H], -1.0e30, tl.float32)
            l_i = tl.zeros([BLOCK_Q * BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_Q * BLOCK_H, BLOCK_DV], tl.float32)
        d0 = tl.arange(0, BLOCK_DK)
        q0 = tl.load(q + token[:, None] * sq_t + head[:, None] * sq_h + d0[None, :] * sq_d,
                     mask=live[:, None] & (d0 < head_dim)[None, :], other=0.0)
        for i in range(i_lo, i_hi):
            start = s0 + i * BLOCK_N + (i >= n_sink).to(tl.int32) * (m0 - s0 - n_sink * BLOCK_N)  # sinks, then main
            m_i, l_i, acc = _tile(m_i, l_i, acc, q0, start, row, seen, p_m, live, token, head, kvh, q, k_cache,
                                 v_cache, block_table, sq_t, sq_h, sq_d, sk_s, sk_t, sk_h, sk_d, sv_s, sv_t, sv_h,
                                 sv_d, sb_r, sb_w, width, head_dim, value_dim, scale, softcap, window, sink_tokens,
                                 chunk, TPB, BLOCK_N, BLOCK_DK, NUM_DK, BLOCK_DV, HAS_WINDOW, HAS_CHUNK,
                                 HAS_SOFTCAP, IEEE)
        dv = tl.arange(0, BLOCK_DV)
        out_mask = live[:, None] & (dv < value_dim)[None, :]
        if NUM_SPLITS == 1:
            result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out + token[:, None] * so_t + head[:, None] * so_h + dv[None, :] * so_d,
                     result.to(out.dtype.element_ty), mask=out_mask)
        else:  # partials [split, token, q head, Dv + 2] (acc, then m and l) for the merge kernel
            at = ((split * num_tokens + token) * num_q_heads + head) * (value_dim + 2)
            tl.store(part + at[:, None] + dv[None, :], acc, mask=out_mask)
            tl.store(part + at + value_dim, m_i, mask=live)
            tl.store(part + at + value_dim + 1, l_i, mask=live)

    @triton.jit  # type: ignore[untyped-decorator]
    def _merge(out, part, num_tokens, num_q_heads, so_t, so_h, so_d, value_dim,  # type: ignore[no-untyped-def]
              NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
        t, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        dv = tl.arange(0, BLOCK_DV)
        at = ((s * num_tokens + t) * num_q_heads + h) * (value_dim + 2)
        m_s = tl.load(part + at + value_dim, mask=s < NUM_SPLITS, other=-1.0e30)
        l_s = tl.load(part + at + value_dim + 1, mask=s < NUM_SPLITS, other=0.0)
        acc = tl.load(part + at[:, None] + dv[None, :],
                      mask=(s < NUM_SPLITS)[:, None] & (dv < value_dim)[None, :], other=0.0)
        w = tl.exp2(m_s - tl.max(m_s, axis=0))
        total = tl.sum(w * l_s, axis=0)
        result = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out + t * so_t + h * so_h + dv * so_d, result.to(out.dtype.element_ty), mask=dv < value_dim)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
           q_row: torch.Tensor, q_pos: torch.Tensor, kv_len: torch.Tensor, sinks: torch.Tensor | None) -> None:
    import torch

    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4 or block_table.dim() != 2:
        raise UsageError(f"paged_attention_triton: q must be [T, Hq, D], the caches [slots, tpb, Hkv, D] and "
                         f"block_table [rows, blocks] (got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}, block_table {tuple(block_table.shape)})")
    hq, hkv = q.shape[1], k_cache.shape[2]
    if hkv == 0 or hq % hkv or v_cache.shape[:3] != k_cache.shape[:3] or q.shape[2] != k_cache.shape[3]:
        raise UsageError(f"paged_attention_triton: q heads {hq} must be a multiple of the kv heads {hkv}, and "
                         f"q / k_cache / v_cache must agree (q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)})")
    t = q.shape[0]
    if q_row.shape != (t,) or q_pos.shape != (t,) or kv_len.shape != (block_table.shape[0],):
        raise UsageError(f"paged_attention_triton: q_row and q_pos need one entry per query token ({t}), kv_len "
                         f"one per block_table row ({block_table.shape[0]}); got {tuple(q_row.shape)}, "
                         f"{tuple(q_pos.shape)}, {tuple(kv_len.shape)}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not q.dtype == k_cache.dtype == v_cache.dtype:
        raise UsageError(f"paged_attention_triton: q, k_cache and v_cache need one dtype of float32 / bfloat16 / "
                         f"float16 (got {q.dtype}, {k_cache.dtype}, {v_cache.dtype})")
    tables = (block_table, q_row, q_pos, kv_len)
    if any(x.dtype.is_floating_point or x.dtype == torch.bool for x in tables) or any(
            x.device != q.device for x in (k_cache, v_cache, *tables)):
        raise UsageError(f"paged_attention_triton: block_table, q_row, q_pos and kv_len must be integer tensors, "
                         f"every argument on q's device {q.device}")
    if sinks is not None and sinks.shape != (hq,):
        raise UsageError(f"paged_attention_triton: sinks must be [Hq] = [{hq}], got {tuple(sinks.shape)}")


def query_groups(q_row: torch.Tensor, block_q: int) -> torch.Tensor:
    """``[T]`` int32: at the first token of each group, the group's size (<= ``block_q``
    consecutive tokens of one row), else 0. Device ops only, no host sync."""
    import torch

    t = torch.arange(q_row.numel(), device=q_row.device)
    if block_q == 1:
        return torch.ones_like(t, dtype=torch.int32)
    new_run = torch.ones_like(t, dtype=torch.bool)
    new_run[1:] = q_row[1:] != q_row[:-1]
    run_first = torch.cummax(torch.where(new_run, t, 0), 0).values
    run_ends = torch.ones_like(new_run)
    run_ends[:-1] = new_run[1:]
    run_last = torch.cummin(torch.where(run_ends, t, t.numel()).flip(0), 0).values.flip(0)
    first = (t - run_first) % block_q == 0
    return torch.where(first, (run_last - t + 1).clamp(max=block_q), 0).to(torch.int32)


def launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
           q_row: torch.Tensor, q_pos: torch.Tensor, kv_len: torch.Tensor, tiles: KernelTiles, *, scale: float,
           window: int | None, sink_tokens: int, chunk: int | None, softcap: float | None,
           sinks: torch.Tensor | None) -> torch.Tensor:
    """``paged_attention_triton`` with the cut given (checked arguments, Triton present)."""
    import torch

    t, hq, head_dim = q.shape
    hkv, value_dim = k_cache.shape[2], v_cache.shape[3]
    out = torch.empty(t, hq, value_dim, dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    block_dk = _pow2(head_dim) if head_dim <= 256 else 64
    block_dv = max(16, _pow2(value_dim))
    part = out  # (unread with one split)
    if tiles.num_splits > 1:
        part = torch.empty(tiles.num_splits, t, hq, value_dim + 2, dtype=torch.float32, device=q.device)
    block_h = min(max(16 // tiles.block_q, _pow2(hq // hkv)), 16)  # query heads per program (M >= 16)
    grid = (t, hkv * -(-(hq // hkv) // block_h), tiles.num_splits)
    group_len = q_row if tiles.block_q == 1 else query_groups(q_row, tiles.block_q)  # (unread for decode)
    _attention[grid](
        q, k_cache, v_cache, out, part, block_table, q_row, q_pos, kv_len, group_len,
        q if sinks is None else sinks, t, hq, *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        *block_table.stride(), block_table.shape[1], head_dim, value_dim, hq // hkv, scale, softcap or 1.0,
        window or 1, sink_tokens, chunk or 1, TPB=k_cache.shape[1], BLOCK_Q=tiles.block_q,
        BLOCK_H=block_h, BLOCK_N=tiles.block_n, BLOCK_DK=max(16, block_dk),
        NUM_DK=-(-head_dim // block_dk), BLOCK_DV=block_dv, NUM_SPLITS=tiles.num_splits,
        HAS_WINDOW=window is not None, HAS_CHUNK=chunk is not None, HAS_SOFTCAP=softcap is not None,
        HAS_SINKS=sinks is not None, IEEE=q.dtype == torch.float32, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages)
    if tiles.num_splits > 1:
        _merge[(t, hq)](out, part, t, hq, *out.stride(), value_dim, NUM_SPLITS=tiles.num_splits,
                       BLOCK_S=_pow2(tiles.num_splits), BLOCK_DV=block_dv)
    return out


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, q_row: torch.Tensor, q_pos: torch.Tensor,
                           kv_len: torch.Tensor, *, scale: float, window: int | None = None, sink_tokens: int = 0,
                           chunk: int | None = None, softcap: float | None = None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the packed queries ``q`` ``[T, Hq, D]`` over their rows' pages, in one
    launch (decode and prefill chunks mixed); the contract of the torch reference
    ``hybridkv.engine.paged_attention.paged_attention``. Returns ``[T, Hq, Dv]`` in q's dtype."""

    if not triton_available():
        raise UsageError("paged_attention_triton needs triton (pip install 'hybridkv[triton]'); "
                         "without it use hybridkv.engine.paged_attention.paged_attention")
    _check(q, k_cache, v_cache, block_table, q_row, q_pos, kv_len, sinks)
    if (window is not None and window < 1) or (chunk is not None and chunk < 1) or sink_tokens < 0 \
            or (softcap is not None and not softcap > 0):
        raise UsageError(f"paged_attention_triton: window and chunk must be >= 1, sink_tokens >= 0 and softcap > 0 "
                         f"(got window={window}, chunk={chunk}, sink_tokens={sink_tokens}, softcap={softcap})")
    tiles = default_tiles(q, k_cache, v_cache, block_table, window, sink_tokens, chunk)
    return launch(q, k_cache, v_cache, block_table, q_row, q_pos, kv_len, tiles, scale=scale, window=window,
                  sink_tokens=sink_tokens, chunk=chunk, softcap=softcap, sinks=sinks)


def pick_paged_attention(device: torch.device) -> Callable[..., torch.Tensor]:
    """The Triton kernel where it can run (triton installed, and a CUDA device or
    ``TRITON_INTERPRET=1``), else the torch reference: the same signature either way."""
    if triton_runs_on(device):
        return paged_attention_triton
    from hybridkv.engine.paged_attention import paged_attention

    return paged_attention
