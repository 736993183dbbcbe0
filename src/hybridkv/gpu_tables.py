"""Page tables to the GPU every step without a synchronization.

Each step's tables (per layer group ``[batch, width]`` int32, plus ``seq_lens``) are packed into
pinned staging buffers and copied to device buffers with non-blocking copies on a side stream;
two sets of buffers are used in turn, so the host writes set ``i % 2`` while set ``i - 1`` may
still be in flight. The host waits only if the copy from two steps ago has not finished (an
event query, normally already done). The compute stream waits on the upload's event, never the
host. Needs torch with CUDA.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hybridkv.manager.step_tables import StepTables


class _GpuTimer:
    """Optional GPU-timeline timing of the side-stream work (``timing = True``); the
    measured intervals land in ``gpu_ms``."""

    timing = False

    def _timer_start(self) -> Any:
        if not self.timing:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream())
        return ev

    def _timer_stop(self, start: Any) -> None:
        if start is None:
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream())
        if not hasattr(self, "gpu_ms"):
            self.gpu_ms: list[Any] = []
        self.gpu_ms.append((start, end))


class PageTableUploader(_GpuTimer):
    """Double-buffered, pinned, non-blocking upload of a step's block tables."""

    def __init__(self, num_layer_groups: int, max_rows: int, max_width: int, device: str = "cuda") -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device)
        n = num_layer_groups * max_rows * max_width + max_rows
        self._host = [torch.empty(n, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self._dev = [torch.empty(n, dtype=torch.int32, device=self.device) for _ in range(2)]
        self._events = [torch.cuda.Event(), torch.cuda.Event()]
        self._used = [False, False]
        self.num_layer_groups, self.max_rows, self.max_width = num_layer_groups, max_rows, max_width
        self.step = 0

    def upload(self, tables: StepTables) -> tuple[list[Any], Any]:
        """Device tensors ``([table per layer group], seq_lens)`` for this step. The compute
        stream is made to wait for them; the host returns at once."""
        i = self.step % 2
        self.step += 1
        if self._used[i]:
            self._events[i].synchronize()  # the copy from two steps ago (normally long done)
        host, dev = self._host[i].numpy(), self._dev[i]
        shapes, offset = [], 0
        for g in range(self.num_layer_groups):
            t = tables.block_table(g)
            if t.shape[1] > self.max_width or t.shape[0] > self.max_rows:
                raise ValueError(f"table {t.shape} exceeds the uploader's {self.max_rows} x {self.max_width}")
            host[offset:offset + t.size].reshape(t.shape)[...] = t
            shapes.append((offset, t.shape))
            offset += t.size
        n = len(tables)
        host[offset:offset + n] = tables.seq_lens
        total = offset + n
        with torch.cuda.stream(self.stream):
            start = self._timer_start()
            dev[:total].copy_(self._host[i][:total], non_blocking=True)
            self._events[i].record(self.stream)
            self._timer_stop(start)
        self._used[i] = True
        torch.cuda.current_stream(self.device).wait_event(self._events[i])
        out = [dev[o:o + int(np.prod(s))].view(*s) for o, s in shapes]
        return out, dev[offset:total]


class TableMirror(_GpuTimer):
    """A GPU copy of the manager's block tables, patched every step from its change log.

    A decode step changes a few entries per request per block boundary, so ``sync()`` ships
    only (entry, slot) pairs: packed into pinned staging (two sets in turn), copied
    non-blocking on a side stream and scattered into the device tables there; the compute
    stream waits on an event, the host never does (unless the staging set from two steps ago
    is still in flight). Device tables are full width ``[max_rows, max_blocks]``; ``tables(n)``
    returns views of the first ``n`` rows, i.e. the batch of ``manager.active_handles()``.
    """

    def __init__(self, manager: Any, device: str = "cuda", capacity: int = 1 << 16) -> None:
        self.rows = manager.rows
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device)
        self.dev = [torch.from_numpy(t).to(self.device) for t in self.rows.tables]
        self.seq_lens = torch.zeros(self.rows.max_rows, dtype=torch.int32, device=self.device)
        self.rows.log = []
        self._capacity = 0
        self._grow(capacity)
        self._events = [torch.cuda.Event(), torch.cuda.Event()]
        self._used = [False, False]
        self.step = 0

    def _grow(self, capacity: int) -> None:
        self._capacity = capacity
        self._idx = [torch.empty(capacity, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self._val = [torch.empty(capacity, dtype=torch.int32, pin_memory=True) for _ in range(2)]

    def _pack(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Per layer group: flat entry indices and slots, the last write of an entry winning."""
        log, self.rows.log = self.rows.log or [], []
        out = []
        for g, table in enumerate(self.rows.tables):
            parts = [c for c in log if c.layer_group == g]
            if not parts:
                continue
            idx = np.concatenate([c.rows * table.shape[1] + c.cols for c in parts])
            val = np.concatenate([c.slots for c in parts])
            _, last = np.unique(idx[::-1], return_index=True)
            keep = idx.size - 1 - last
            out.append((g, idx[keep], val[keep]))
        return out

    def sync(self) -> None:
        """Ship this step's table changes and seq_lens; the compute stream waits for them."""
        i = self.step % 2
        self.step += 1
        if self._used[i]:
            self._events[i].synchronize()
        packed = self._pack()
        n = self.rows.n
        total = sum(int(p[1].size) for p in packed) + n
        if total > self._capacity:
            torch.cuda.synchronize(self.device)
            self._grow(max(total, 2 * self._capacity))
        idx, val = self._idx[i].numpy(), self._val[i].numpy()
        spans, offset = [], 0
        for g, ix, v in packed:
            idx[offset:offset + ix.size], val[offset:offset + ix.size] = ix, v
            spans.append((g, offset, ix.size))
            offset += ix.size
        val[offset:offset + n] = self.rows.seq_lens[:n]
        with torch.cuda.stream(self.stream):
            start = self._timer_start()
            d_idx = self._idx[i][:offset].to(self.device, non_blocking=True)
            d_val = self._val[i][:offset + n].to(self.device, non_blocking=True)
            for g, o, k in spans:
                self.dev[g].view(-1).index_copy_(0, d_idx[o:o + k], d_val[o:o + k])
            self.seq_lens[:n].copy_(d_val[offset:offset + n])
            self._events[i].record(self.stream)
            self._timer_stop(start)
        self._used[i] = True
        torch.cuda.current_stream(self.device).wait_event(self._events[i])

    def tables(self, n: int | None = None) -> list[Any]:
        n = self.rows.n if n is None else n
        return [t[:n] for t in self.dev]
