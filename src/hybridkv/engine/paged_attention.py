"""Paged attention in plain torch: the CPU path of the reference engine and the oracle a GPU
kernel is checked against.

The step's query tokens of every row are packed into one ``[T, Hq, D]`` tensor; each row's
keys and values live in pages of one layer (``k_cache[slot, offset]``) that the row's block
table names, one slot per block ordinal::

    position j of row r  ->  k_cache[block_table[r, j // tpb], j % tpb]

A query at position ``p`` sees key ``j`` when ``j <= p`` and the layer's life cycle keeps it
(inside the window, a sink token, the same chunk). A released window block has slot
``NULL_SLOT`` (-1): the mask never looks there, and reading a hole the mask does look at is a
bug in whoever built the table (``InvariantError``). Everything is computed in float32, per
row, in one masked softmax; learned sinks (GPT-OSS) add one logit per head to the softmax
denominator with no value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hybridkv.core.errors import InvariantError, UsageError

if TYPE_CHECKING:
    import torch


def _check_shapes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                  q_row: torch.Tensor, q_pos: torch.Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise UsageError(f"paged_attention: q must be [T, Hq, D] and the caches [slots, tpb, Hkv, D] "
                         f"(got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)})")
    hq, hkv = q.shape[1], k_cache.shape[2]
    if hkv == 0 or hq % hkv or v_cache.shape[:3] != k_cache.shape[:3] or q.shape[2] != k_cache.shape[3]:
        raise UsageError(f"paged_attention: q heads {hq} must be a multiple of the cache's kv heads {hkv}, "
                         f"and q / k_cache / v_cache must agree (q {tuple(q.shape)}, k_cache "
                         f"{tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)})")
    if q_row.shape != (q.shape[0],) or q_pos.shape != (q.shape[0],) or block_table.dim() != 2:
        raise UsageError(f"paged_attention: q_row and q_pos need one entry per query token ({q.shape[0]}) "
                         f"and block_table must be [rows, blocks] (got {tuple(block_table.shape)})")


def visible_mask(q_pos: torch.Tensor, key_pos: torch.Tensor, *, window: int | None, sink_tokens: int,
                 chunk: int | None) -> torch.Tensor:
    """``[Tq, L]`` bool: does the query at ``q_pos[i]`` see the key at ``key_pos[j]``?"""
    p, j = q_pos[:, None], key_pos[None, :]
    mask = j <= p
    if window is not None:
        mask &= (p - j < window) | (j < sink_tokens)
    if chunk is not None:
        mask &= (j // chunk) == (p // chunk)
    return mask


def _row_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *,
                   scale: float, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """One row's queries ``[Tq, Hq, D]`` over its keys ``[L, Hkv, D]`` (float32), ``[Tq, Hq, Dv]``."""
    import torch

    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)  # [L, Hq, D]
    v = values.repeat_interleave(group, dim=1)
    logits = torch.einsum("thd,lhd->htl", q, k) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.masked_fill(~mask[None], float("-inf"))
    if sinks is not None:  # an extra column per head that takes probability but carries no value
        column = sinks.float()[:, None, None].expand(-1, logits.shape[1], 1)
        probs = torch.softmax(torch.cat([logits, column], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1)
    return torch.einsum("htl,lhd->thd", probs, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    q_row: torch.Tensor, q_pos: torch.Tensor, kv_len: torch.Tensor, *, scale: float,
                    window: int | None = None, sink_tokens: int = 0, chunk: int | None = None,
                    softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the packed queries ``q`` ``[T, Hq, D]`` over their rows' pages.

    ``block_table`` ``[R, W]`` int32 (``NULL_SLOT`` where a row holds no page), ``q_row`` /
    ``q_pos`` ``[T]`` the row and absolute position of each query, ``kv_len`` ``[R]`` the
    tokens each row can see after this step's writes. Returns ``[T, Hq, Dv]`` in q's dtype."""
    import torch

    _check_shapes(q, k_cache, v_cache, block_table, q_row, q_pos)
    tpb = k_cache.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], v_cache.shape[3], dtype=torch.float32, device=q.device)
    table = block_table.long()
    for r in torch.unique(q_row).tolist():
        idx = torch.nonzero(q_row == r).flatten()
        length = int(kv_len[r])
        if length > table.shape[1] * tpb:
            raise UsageError(f"paged_attention: row {r} sees {length} tokens but its table holds "
                             f"{table.shape[1]} blocks of {tpb}")
        pos = torch.arange(length, device=q.device)
        mask = visible_mask(q_pos[idx], pos, window=window, sink_tokens=sink_tokens, chunk=chunk)
        slots = table[r, pos // tpb]
        if bool((mask.any(dim=0) & (slots < 0)).any()):
            bad = int(pos[mask.any(dim=0) & (slots < 0)][0])
            raise InvariantError(f"paged_attention: row {r} has no page for visible position {bad}")
        slots = slots.clamp(min=0)
        keys = k_cache[slots, pos % tpb].float()
        values = v_cache[slots, pos % tpb].float()
        out[idx] = _row_attention(q[idx].float(), keys, values, mask, scale=scale, softcap=softcap, sinks=sinks)
    return out.to(q.dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, rows: torch.Tensor,
             positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Scatter the step's new keys / values ``[T, Hkv, D]`` (row ``rows[t]``, position
    ``positions[t]``) into their pages. Writing through a hole is a bug (``InvariantError``)."""
    tpb = k_cache.shape[1]
    slots = block_table.long()[rows, positions // tpb]
    if bool((slots < 0).any()):
        raise InvariantError("write_kv: a written position has no page in its row's block table")
    offsets = positions % tpb
    k_cache[slots, offsets] = k.to(k_cache.dtype)
    v_cache[slots, offsets] = v.to(v_cache.dtype)
