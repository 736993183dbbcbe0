"""The Triton paged-attention kernel against a float64 dense brute force (and the torch
reference when it is importable), on tiny shapes under ``TRITON_INTERPRET=1`` on CPU, or on a
CUDA device.

Every pool byte the mask does not reach is NaN: a guard slot sits where slot ``-1`` would
point, unwritten and stale pages and the keys no query of the step sees are all NaN, so a
single load the kernel should have skipped turns the output into NaN. Tolerances (absolute,
against float64 on the same rounded inputs): float32 2e-5, float16 5e-3, bfloat16 2e-2.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from hybridkv.core.errors import UsageError  # noqa: E402
from hybridkv.engine import triton_attention as ta  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(
    not ta.triton_available() or not (HAS_CUDA or INTERPRET),
    reason="needs triton and a CUDA device, or triton with TRITON_INTERPRET=1 on CPU")
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
F32_TOL, F16_TOL, BF16_TOL = 2e-5, 5e-3, 2e-2


@pytest.fixture(autouse=True, scope="module")
def _interpreter_takes_numpy_scalars() -> object:
    """Triton's interpreter (up to 3.6) turns a scalar into an int with ``int(array)``, which
    NumPy >= 2.4 refuses for its one-element arrays (triton-lang/triton issue 9171), so every
    loop with runtime bounds fails. Convert through ``reshape(-1)[0]`` while these tests run."""
    if not (INTERPRET and ta.triton_available()):
        yield None
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor: object, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))  # type: ignore[attr-defined]

    interpreter._patch_lang_tensor = patched
    yield None
    interpreter._patch_lang_tensor = original


@dataclass(frozen=True)
class Mask:
    window: int | None = None
    sink_tokens: int = 0
    chunk: int | None = None

    def visible(self, p: int, j: int) -> bool:
        return (j <= p and (self.window is None or p - j < self.window or j < self.sink_tokens)
                and (self.chunk is None or j // self.chunk == p // self.chunk))


@dataclass
class Case:
    """One step: per row its queries' positions; pages in a slot-major pool full of NaN."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    table: torch.Tensor
    q_row: torch.Tensor
    q_pos: torch.Tensor
    kv_len: torch.Tensor
    keys: list[torch.Tensor]  # per row [L, Hkv, D] float64, as stored
    values: list[torch.Tensor]


def make_case(rows: list[tuple[int, int]], mask: Mask, hq: int, hkv: int, d: int, dv: int, tpb: int,
              dtype: torch.dtype = torch.float32, mla: bool = False, seed: int = 0, poison: bool = True) -> Case:
    """``rows``: (kv_len, queries) per row; the queries are the row's last positions. With
    ``poison`` every byte the mask does not reach is NaN, else zero (the torch reference
    gathers every position below ``kv_len`` before it masks)."""
    g = torch.Generator().manual_seed(seed)
    q_row, q_pos, lens = [], [], []
    for r, (length, n) in enumerate(rows):
        q_row += [r] * n
        q_pos += list(range(length - n, length))
        lens.append(length)
    width = max(-(-n // tpb) for n, _ in rows) + 1
    num_slots = sum(-(-n // tpb) for n, _ in rows) + 3
    page_k, page_v = tpb * hkv * d, (0 if mla else tpb * hkv * dv)
    slot_elems = page_k + page_v + 5  # another layer's bytes follow: the slot stride is not one page
    pool = torch.full(((num_slots + 1) * slot_elems,), float("nan") if poison else 0.0, dtype=dtype)
    base = slot_elems  # the guard slot before slot 0 is where slot -1 would read
    k_cache = pool.as_strided((num_slots, tpb, hkv, d), (slot_elems, hkv * d, d, 1), base)
    v_cache = (k_cache[..., :dv] if mla else
               pool.as_strided((num_slots, tpb, hkv, dv), (slot_elems, hkv * dv, dv, 1), base + page_k))
    free = torch.randperm(num_slots, generator=g).tolist()
    table = torch.full((len(rows), width), -1, dtype=torch.int32)
    keys, values = [], []
    for r, (length, _) in enumerate(rows):
        k = torch.randn(length, hkv, d, generator=g, dtype=torch.float64).to(dtype)
        v = k[..., :dv] if mla else torch.randn(length, hkv, dv, generator=g, dtype=torch.float64).to(dtype)
        pos = [p for p, rr in zip(q_pos, q_row, strict=True) if rr == r]
        seen = [j for j in range(length) if any(mask.visible(p, j) for p in pos)]
        for b in sorted({j // tpb for j in seen}):
            table[r, b] = free.pop()
        for j in seen:
            k_cache[table[r, j // tpb], j % tpb] = k[j]
            if not mla:
                v_cache[table[r, j // tpb], j % tpb] = v[j]
        keys.append(k.double())
        values.append(v.double())
    q = torch.randn(len(q_row), hq, d, generator=g, dtype=torch.float64).to(dtype)
    return Case(q, k_cache, v_cache, table, torch.tensor(q_row), torch.tensor(q_pos), torch.tensor(lens),
                keys, values)


def dense_reference(c: Case, mask: Mask, scale: float, softcap: float | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Float64, one query and one head at a time, straight from the definition."""
    t, hq, _ = c.q.shape
    hkv = c.keys[0].shape[1]
    out = torch.zeros(t, hq, c.values[0].shape[2], dtype=torch.float64)
    for i in range(t):
        r, p = int(c.q_row[i]), int(c.q_pos[i])
        js = [j for j in range(int(c.kv_len[r])) if mask.visible(p, j)]
        for h in range(hq):
            kh = h // (hq // hkv)
            logits = (c.keys[r][js, kh] @ c.q[i, h].double()) * scale
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            extra = sinks[h].double().reshape(1) if sinks is not None else torch.empty(0, dtype=torch.float64)
            probs = torch.softmax(torch.cat([logits, extra]), 0)[: len(js)]
            out[i, h] = probs @ c.values[r][js, kh]
    return out


def run(c: Case, mask: Mask, scale: float, tiles: ta.KernelTiles | None = None, **kw: object) -> torch.Tensor:
    args = [x.to(DEVICE) for x in (c.q, c.k_cache, c.v_cache, c.table, c.q_row, c.q_pos, c.kv_len)]
    if DEVICE == "cuda":  # move the pool views with their strides (one copy of the whole pool)
        args[1], args[2] = (_to_cuda(x) for x in (c.k_cache, c.v_cache))
    extra = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if tiles is None:
        out = ta.paged_attention_triton(*args, scale=scale, window=mask.window, sink_tokens=mask.sink_tokens,
                                        chunk=mask.chunk, **extra)  # type: ignore[arg-type]
    else:
        out = ta.launch(*args, tiles, scale=scale, window=mask.window, sink_tokens=mask.sink_tokens,
                        chunk=mask.chunk, softcap=extra.get("softcap"), sinks=extra.get("sinks"))  # type: ignore[arg-type]
    return out.cpu()


def _to_cuda(view: torch.Tensor) -> torch.Tensor:
    pool = torch.empty(0, dtype=view.dtype).set_(view.untyped_storage()).cuda()
    return pool.as_strided(view.shape, view.stride(), view.storage_offset())


def check(c: Case, mask: Mask, tol: float, tiles: ta.KernelTiles | None = None, **kw: object) -> float:
    scale = 1 / math.sqrt(c.q.shape[2])
    got = run(c, mask, scale, tiles, **kw)
    want = dense_reference(c, mask, scale, **kw)  # type: ignore[arg-type]
    assert got.dtype == c.q.dtype and got.shape == want.shape
    err = float((got.double() - want).abs().max())
    assert err <= tol, f"max |error| {err:.3g} > {tol}"
    return err


MIXED = [(9, 1), (14, 4), (4, 4), (22, 1), (19, 9)]  # (kv_len, queries): decodes and prefill chunks
MASKS = {"full": Mask(), "window": Mask(window=6), "window+sinks": Mask(window=5, sink_tokens=3),
         "chunk": Mask(chunk=8), "chunk+window": Mask(window=6, chunk=8)}


@needs_triton
@pytest.mark.parametrize("name", list(MASKS))
def test_masks_on_mixed_decode_and_prefill(name: str) -> None:
    check(make_case(MIXED, MASKS[name], hq=4, hkv=2, d=32, dv=32, tpb=4), MASKS[name], F32_TOL)


@needs_triton
@pytest.mark.parametrize("name", ["full", "window+sinks", "chunk"])
def test_decode_one_query_per_row(name: str) -> None:
    rows = [(9, 1), (14, 1), (4, 1), (22, 1), (1, 1)]
    check(make_case(rows, MASKS[name], hq=4, hkv=2, d=32, dv=32, tpb=4, seed=7), MASKS[name], F32_TOL)


@needs_triton
@pytest.mark.parametrize("tiles", [ta.KernelTiles(block_q=4, block_n=16, num_splits=3),
                                   ta.KernelTiles(block_q=1, block_n=32, num_splits=2),
                                   ta.KernelTiles(block_q=8, block_n=16, num_splits=1)])
def test_every_cut_gives_the_same_answer(tiles: ta.KernelTiles) -> None:
    """Several groups per row, keys split across programs and merged, sinks only in split 0."""
    mask = Mask(window=7, sink_tokens=2)
    c = make_case(MIXED, mask, hq=6, hkv=2, d=24, dv=16, tpb=3, seed=1)
    check(c, mask, F32_TOL, tiles, softcap=2.0, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.3]))


@needs_triton
def test_softcap_and_learned_sinks_with_gqa() -> None:
    mask = Mask(window=8)
    c = make_case(MIXED, mask, hq=8, hkv=2, d=16, dv=16, tpb=4, seed=2)
    check(c, mask, F32_TOL, softcap=1.5, sinks=torch.linspace(-2, 3, 8))


@needs_triton
def test_mla_latent_keys_with_values_in_their_first_channels() -> None:
    """One latent KV head of width 48 (32 latent + 16 rope); V is the first 32 channels."""
    c = make_case(MIXED, Mask(), hq=4, hkv=1, d=48, dv=32, tpb=4, mla=True, seed=3)
    assert c.v_cache.data_ptr() == c.k_cache.data_ptr()
    check(c, Mask(), F32_TOL)


@needs_triton
def test_many_query_heads_on_one_latent_head_take_several_programs() -> None:
    """32 query heads on one KV head: programs take 16 heads each and load K / V separately."""
    c = make_case([(9, 1), (12, 3)], Mask(window=5), hq=32, hkv=1, d=24, dv=16, tpb=4, mla=True, seed=8)
    check(c, Mask(window=5), F32_TOL)


@needs_triton
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, F16_TOL), (torch.bfloat16, BF16_TOL)])
def test_half_precision_accumulates_in_float32(dtype: torch.dtype, tol: float) -> None:
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the interpreter's tl.dot on bfloat16 operands is wrong (triton 3.6); checked on CUDA")
    mask = Mask(window=6, sink_tokens=1)
    check(make_case(MIXED, mask, hq=4, hkv=1, d=32, dv=32, tpb=4, dtype=dtype, seed=4), mask, tol)


@needs_triton
def test_agrees_with_the_torch_reference() -> None:
    reference = pytest.importorskip("hybridkv.engine.paged_attention")
    mask = Mask(window=5, sink_tokens=2)
    c = make_case(MIXED, mask, hq=4, hkv=2, d=32, dv=32, tpb=4, seed=5, poison=False)
    got = run(c, mask, 0.2, softcap=3.0, sinks=torch.tensor([0.1, 0.2, -0.5, 1.0]))
    want = reference.paged_attention(c.q, c.k_cache, c.v_cache, c.table, c.q_row, c.q_pos, c.kv_len, scale=0.2,
                                     window=5, sink_tokens=2, softcap=3.0, sinks=torch.tensor([0.1, 0.2, -0.5, 1.0]))
    assert float((got - want).abs().max()) <= F32_TOL


def test_query_groups_cut_runs_of_one_row() -> None:
    rows = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2, 0, 0])
    assert ta.query_groups(rows, 2).tolist() == [2, 0, 2, 0, 1, 1, 2, 0, 2, 0]
    assert ta.query_groups(rows, 4).tolist() == [4, 0, 0, 0, 1, 1, 2, 0, 2, 0]
    assert ta.query_groups(rows, 1).tolist() == [1] * 10


def test_choose_tiles_splits_decode_only_when_programs_are_few() -> None:
    small = ta.choose_tiles(32, 32, 8192, 4, 1, 256, 256, num_sms=132)
    assert (small.block_q, small.block_n, small.num_splits) == (1, 64, 8)
    assert ta.choose_tiles(128, 128, 8192, 4, 1, 256, 256, num_sms=132).num_splits == 2
    assert ta.choose_tiles(256, 256, 8192, 4, 1, 256, 256, num_sms=132).num_splits == 1
    assert ta.choose_tiles(32, 32, 128, 4, 1, 256, 256, num_sms=132).num_splits == 2  # one tile per split at least
    assert ta.choose_tiles(8, 8, 576, 16, 1, 576, 512, num_sms=132).block_n == 32  # MLA: wide values
    prefill = ta.choose_tiles(8192, 2, 8192, 4, 1, 256, 256, num_sms=132)
    assert (prefill.block_q, prefill.num_splits) == (8, 1)
    with pytest.raises(UsageError, match="power of two"):
        ta.KernelTiles(block_q=3, block_n=32, num_splits=1)


@needs_triton
def test_misuse_is_a_usage_error() -> None:
    c = make_case([(5, 1)], Mask(), hq=3, hkv=2, d=16, dv=16, tpb=4)
    with pytest.raises(UsageError, match="multiple of the kv heads"):
        ta.paged_attention_triton(c.q, c.k_cache, c.v_cache, c.table, c.q_row, c.q_pos, c.kv_len, scale=1.0)
    c = make_case([(5, 1)], Mask(), hq=2, hkv=2, d=16, dv=16, tpb=4)
    with pytest.raises(UsageError, match="one dtype"):
        ta.paged_attention_triton(c.q.double(), c.k_cache, c.v_cache, c.table, c.q_row, c.q_pos, c.kv_len, scale=1.0)
    with pytest.raises(UsageError, match="window and chunk"):
        ta.paged_attention_triton(c.q, c.k_cache, c.v_cache, c.table, c.q_row, c.q_pos, c.kv_len, scale=1.0,
                                  window=0)
    with pytest.raises(UsageError, match="integer tensors"):
        ta.paged_attention_triton(c.q, c.k_cache, c.v_cache, c.table, c.q_row, c.q_pos.float(), c.kv_len, scale=1.0)
    with pytest.raises(UsageError, match="softcap > 0"):
        ta.paged_attention_triton(c.q, c.k_cache, c.v_cache, c.table, c.q_row, c.q_pos, c.kv_len, scale=1.0,
                                  softcap=0.0)


@needs_triton
def test_a_step_without_queries_returns_an_empty_result() -> None:
    c = make_case([(5, 1)], Mask(), hq=2, hkv=2, d=16, dv=8, tpb=4)
    none = torch.zeros(0, dtype=torch.int64)
    out = ta.paged_attention_triton(c.q[:0], c.k_cache, c.v_cache, c.table, none, none, c.kv_len, scale=1.0)
    assert out.shape == (0, 2, 8)


def test_without_triton_the_call_says_so_and_the_reference_is_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ta, "triton", None)
    assert not ta.triton_available()
    c = make_case([(5, 1)], Mask(), hq=2, hkv=2, d=16, dv=16, tpb=4)
    with pytest.raises(UsageError, match="needs triton"):
        ta.paged_attention_triton(c.q, c.k_cache, c.v_cache, c.table, c.q_row, c.q_pos, c.kv_len, scale=1.0)
    if os.path.exists(os.path.join(os.path.dirname(ta.__file__), "paged_attention.py")):
        assert ta.pick_paged_attention(torch.device("cpu")).__name__ == "paged_attention"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs CUDA (and no TRITON_INTERPRET)")
@pytest.mark.parametrize("mask", [Mask(), Mask(window=64, sink_tokens=4), Mask(chunk=96)])
def test_gemma_sized_decode_and_prefill_on_cuda(mask: Mask) -> None:
    """Head dim 256, 4 query heads on 1 KV head, 16-token pages; bf16 and fp32; default cuts."""
    rows = [(300, 1)] * 6 + [(200, 70), (257, 1), (129, 129)]
    for dtype, tol in ((torch.float32, F32_TOL), (torch.bfloat16, BF16_TOL)):
        check(make_case(rows, mask, hq=4, hkv=1, d=256, dv=256, tpb=16, dtype=dtype, seed=6), mask, tol)


def test_the_module_imports_without_triton() -> None:
    code = ("import sys; sys.modules['triton'] = None; import hybridkv.engine.triton_attention as m; "
            "assert not m.triton_available()")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs CUDA (and no TRITON_INTERPRET)")
def test_deepseek_sized_mla_on_cuda() -> None:
    """16 query heads on one latent head of 576 (512 latent + 64 rope), values the first 512."""
    rows = [(200, 1)] * 4 + [(90, 40)]
    for dtype, tol in ((torch.float32, F32_TOL), (torch.bfloat16, BF16_TOL)):
        c = make_case(rows, Mask(), hq=16, hkv=1, d=576, dv=512, tpb=16, dtype=dtype, mla=True, seed=9)
        check(c, Mask(), tol)


def write_case(mla: bool) -> tuple[Any, ...]:
    """Pages of 6 slots x 4 tokens, 3 rows whose tables have holes; 8 tokens, four of them in
    a hole (row 1 at 2 and 9, both of the padding row 2). Keys arrive as a transposed view."""
    g = torch.Generator().manual_seed(3)
    hkv, d, dv = (1, 10, 8) if mla else (2, 8, 4)
    k_cache = torch.randn(6, 4, hkv, d, generator=g)
    v_cache = k_cache[..., :dv] if mla else torch.randn(6, 4, hkv, dv, generator=g)
    table = torch.tensor([[3, 0, 5], [-1, 2, -1], [-1, -1, -1]], dtype=torch.int32)
    rows = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    positions = torch.tensor([3, 4, 9, 2, 5, 9, 0, 11])
    k = torch.randn(hkv, 8, d, generator=g).transpose(0, 1)
    v = k[..., :dv] if mla else torch.randn(8, hkv, dv, generator=g)
    return k_cache, v_cache, table, rows, positions, k, v


@needs_triton
@pytest.mark.parametrize("mla", [False, True])
def test_triton_write_skips_holes_and_matches_the_torch_write(mla: bool) -> None:
    from hybridkv.engine.paged_attention import write_kv
    from hybridkv.engine.triton_write import write_kv_skipping_holes, write_kv_triton

    k_cache, v_cache, table, rows, positions, k, v = write_case(mla)
    want_k = k_cache.clone()
    want_v = want_k[..., :v_cache.shape[-1]] if mla else v_cache.clone()
    keep = torch.tensor([True, True, True, False, True, False, False, False])  # 1@2, 1@9, row 2: holes
    write_kv(want_k, want_v, table, rows[keep], positions[keep], k[keep], v[keep])
    got_k = k_cache.clone().to(DEVICE)
    got_v = got_k[..., :v_cache.shape[-1]] if mla else v_cache.clone().to(DEVICE)
    write_kv_triton(got_k, got_v, table.to(DEVICE), rows.to(DEVICE), positions.to(DEVICE), k.to(DEVICE), v.to(DEVICE))
    assert torch.equal(got_k.cpu(), want_k) and torch.equal(got_v.cpu(), want_v)
    skip_k, skip_v = k_cache.clone(), v_cache.clone()
    if mla:
        skip_v = skip_k[..., :v_cache.shape[-1]]
    write_kv_skipping_holes(skip_k, skip_v, table, rows, positions, k, v)
    assert torch.equal(skip_k, want_k) and torch.equal(skip_v, want_v)


def test_triton_write_misuse_is_a_usage_error() -> None:
    from hybridkv.engine.triton_write import write_kv_triton

    k_cache, v_cache, table, rows, positions, k, v = write_case(False)
    if not ta.triton_available():
        with pytest.raises(UsageError, match="needs triton"):
            write_kv_triton(k_cache, v_cache, table, rows, positions, k, v)
        return
    with pytest.raises(UsageError, match="must match their caches' last two dims"):
        write_kv_triton(k_cache, v_cache, table, rows, positions, k[..., :4], v)
