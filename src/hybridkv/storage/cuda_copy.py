"""The CUDA copy engine: scattered page moves between GPU pools and pinned host pools.

Moves run on a side stream: each ``copy`` first waits for the work already queued on the
caller's (compute) stream, so the source bytes are final, then issues the copy and records an
event; ``fence()`` returns that event for the compute stream to wait on only where it reads
the moved pages. Contiguous runs of slots are merged into single copies first.

Mechanisms (BENCHMARKS.md has the measurements that chose the default):

- ``batched``: one ``cuMemcpyBatchAsync`` driver call for all runs: the DMA copy engines
  move the pages, no SM is used (so compute is not slowed), one API call per move.
- ``kernel``: a Triton gather/scatter kernel that reads or writes pinned host memory
  directly through its unified address (zero-copy); uses SMs.
- ``runs``: one ``cudaMemcpyAsync`` per contiguous run (DMA, but one call per run).
- ``gather``: the naive way: ``index_select`` into a temporary, then one copy.
- ``auto`` (default): ``batched`` for slots of 1 MiB and more (DMA reaches ~91-95% of the PCIe
  ceiling there and takes no SM), else ``kernel`` bounded to 4 CTAs (84-95% of the ceiling
  for 64 KiB - 2 MiB pages while taking 4 of 132 SMs from compute). Measured on an H100.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from hybridkv.core.errors import ConfigError
from hybridkv.storage.backends import PoolBuffer
from hybridkv.storage.copy import check_copy_args, contiguous_runs
from hybridkv.storage.torch_backend import TorchBuffer

I32 = npt.NDArray[np.int32]
MECHANISMS = ("auto", "batched", "kernel", "runs", "gather")
AUTO_DMA_MIN_BYTES = 1 << 20  # auto: DMA for slots this large, the 4-CTA kernel below
AUTO_KERNEL_CTAS = 4


class _MemcpyAttributes(ctypes.Structure):
    """CUmemcpyAttributes (cuda.h, CUDA >= 12.8)."""

    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint_type", ctypes.c_int),
                ("srcLocHint_id", ctypes.c_int), ("dstLocHint_type", ctypes.c_int),
                ("dstLocHint_id", ctypes.c_int), ("flags", ctypes.c_uint)]


_SRC_ACCESS_ORDER_STREAM = 1
_FLAG_PREFER_OVERLAP_WITH_COMPUTE = 1


class _BatchMemcpy:
    """``cuMemcpyBatchAsync`` through ctypes (CUDA 13 signature, or 12.8's with failIdx)."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise ConfigError(f"batched copies need the CUDA driver library: {e}") from None
        self.fn, self.with_fail_idx = None, False
        for name, fail_idx in (("cuMemcpyBatchAsync_v2", False), ("cuMemcpyBatchAsync", True)):
            if hasattr(lib, name):
                self.fn, self.with_fail_idx = getattr(lib, name), fail_idx
                break
        if self.fn is None:
            raise ConfigError("this CUDA driver has no cuMemcpyBatchAsync (needs CUDA >= 12.8)")
        self.attrs = _MemcpyAttributes(_SRC_ACCESS_ORDER_STREAM, 0, 0, 0, 0, _FLAG_PREFER_OVERLAP_WITH_COMPUTE)
        self.attr_idx = (ctypes.c_size_t * 1)(0)

    def __call__(self, dsts: npt.NDArray[np.uint64], srcs: npt.NDArray[np.uint64],
                 sizes: npt.NDArray[np.uint64], stream: int) -> None:
        ptr = ctypes.c_void_p
        args: list[Any] = [dsts.ctypes.data_as(ptr), srcs.ctypes.data_as(ptr), sizes.ctypes.data_as(ptr),
                           ctypes.c_size_t(dsts.size), ctypes.byref(self.attrs), self.attr_idx, ctypes.c_size_t(1)]
        fail = ctypes.c_size_t(0)
        if self.with_fail_idx:
            args.append(ctypes.byref(fail))
        args.append(ctypes.c_void_p(stream))
        err = self.fn(*args)  # type: ignore[misc]
        if err != 0:
            raise RuntimeError(f"cuMemcpyBatchAsync failed with CUresult {err} (copy {fail.value})")


def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def copy_pages(src, dst, src_idx, dst_idx, words_per_page, items, blocks_per_page,  # type: ignore[no-untyped-def]
                   BLOCK: tl.constexpr):
        # persistent: program p copies work items p, p + grid, ... (item = one BLOCK of a page)
        for item in range(tl.program_id(0), items, tl.num_programs(0)):
            page = item // blocks_per_page
            offs = (item % blocks_per_page) * BLOCK + tl.arange(0, BLOCK)
            s = tl.load(src_idx + page).to(tl.int64) * words_per_page
            d = tl.load(dst_idx + page).to(tl.int64) * words_per_page
            mask = offs < words_per_page
            tl.store(dst + d + offs, tl.load(src + s + offs, mask=mask), mask=mask)

    return copy_pages


class _HostPointer:
    """A pinned host tensor presented to Triton by its unified (device-visible) address."""

    def __init__(self, t: Any) -> None:
        self.t, self.dtype = t, t.dtype

    def data_ptr(self) -> int:
        return int(self.t.data_ptr())


class CudaCopyEngine:
    """Page moves between torch buffers (CUDA and pinned host) on a side stream."""

    def __init__(self, mechanism: str = "auto", device: str = "cuda", max_ctas: int | None = None,
                 num_warps: int = 8, block_words: int = 4096) -> None:
        """``max_ctas`` bounds the kernel mechanism's grid (it then loops): fewer SMs taken
        from compute, at some cost in bandwidth; None = one program per work item.
        ``num_warps`` and ``block_words`` (8-byte words per work item) shape the kernel."""
        if mechanism not in MECHANISMS:
            raise ConfigError(f"unknown copy mechanism {mechanism!r}; use one of {MECHANISMS}")
        self.mechanism, self.device, self.max_ctas = mechanism, torch.device(device), max_ctas
        self.num_warps, self.block_words = num_warps, block_words
        self.stream = torch.cuda.Stream(device=self.device)
        self.done = torch.cuda.Event()
        self._batch = _BatchMemcpy() if mechanism in ("batched", "auto") else None
        self._copy_pages = _kernel() if mechanism in ("kernel", "auto") else None

    def copy(self, src: PoolBuffer, src_slots: I32, dst: PoolBuffer, dst_slots: I32) -> None:
        check_copy_args(src, src_slots, dst, dst_slots)
        if src_slots.size == 0:
            return
        if not (isinstance(src, TorchBuffer) and isinstance(dst, TorchBuffer)):
            dst.write(dst_slots, src.read(src_slots))  # disk and NumPy tiers: through the host
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            getattr(self, f"_{self._choose(src.slot_bytes)}")(src, src_slots, dst, dst_slots)
            self.done.record(self.stream)
        for t in (src.tensor, dst.tensor):  # keep the caching allocator from reusing them early
            if t.is_cuda:
                t.record_stream(self.stream)

    def _choose(self, slot_bytes: int) -> str:
        if self.mechanism != "auto":
            return self.mechanism
        return "batched" if slot_bytes >= AUTO_DMA_MIN_BYTES or slot_bytes % 8 else "kernel"

    def _batched(self, src: TorchBuffer, s: I32, dst: TorchBuffer, d: I32) -> None:
        runs = np.asarray(contiguous_runs(s, d), dtype=np.uint64).reshape(-1, 3)
        sb = np.uint64(src.slot_bytes)
        srcs = np.uint64(src.tensor.data_ptr()) + runs[:, 0] * sb
        dsts = np.uint64(dst.tensor.data_ptr()) + runs[:, 1] * sb
        assert self._batch is not None
        self._batch(np.ascontiguousarray(dsts), np.ascontiguousarray(srcs), runs[:, 2] * sb, self.stream.cuda_stream)

    def _runs(self, src: TorchBuffer, s: I32, dst: TorchBuffer, d: I32) -> None:
        for a, b, n in contiguous_runs(s, d):
            dst.tensor[b:b + n].copy_(src.tensor[a:a + n], non_blocking=True)

    def _gather(self, src: TorchBuffer, s: I32, dst: TorchBuffer, d: I32) -> None:
        """index_select into a temporary on the source device, one copy, index_copy_ (the
        host side of it runs on the CPU, so a device->host move waits for its copy)."""
        si = torch.from_numpy(s.astype(np.int64)).to(src.device)
        di = torch.from_numpy(d.astype(np.int64)).to(dst.device)
        moved = src.tensor.index_select(0, si).to(dst.device, non_blocking=dst.tensor.is_cuda)
        dst.tensor.index_copy_(0, di, moved)

    def _kernel(self, src: TorchBuffer, s: I32, dst: TorchBuffer, d: I32) -> None:
        if src.slot_bytes % 8:
            raise ConfigError("the kernel copy needs slot sizes that are multiples of 8 bytes")
        words = src.slot_bytes // 8
        idx = torch.from_numpy(np.stack([s, d]).astype(np.int32)).to(self.device, non_blocking=True)

        def arg(b: TorchBuffer) -> Any:
            t = b.tensor.view(torch.int64)
            return t if t.is_cuda else _HostPointer(t)

        block = min(self.block_words, 1 << max(int(words - 1).bit_length(), 7))
        per_page = -(-words // block)
        items = int(s.size) * per_page
        ctas = self.max_ctas or (AUTO_KERNEL_CTAS if self.mechanism == "auto" else items)
        grid = (min(items, ctas),)
        assert self._copy_pages is not None
        self._copy_pages[grid](arg(src), arg(dst), idx[0], idx[1], words, items, per_page,
                               BLOCK=block, num_warps=self.num_warps)

    def fence(self) -> Any:
        """The event after the last copy issued; ``torch.cuda.current_stream().wait_event``."""
        return self.done

    def synchronize(self) -> None:
        self.stream.synchronize()

    def wait_for_copies(self) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.done)
