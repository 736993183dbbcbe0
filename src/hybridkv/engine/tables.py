"""Page tables to the GPU every step without a synchronization.

Each step's tables (per layer group ``[batch, width]`` int32, plus ``seq_lens``) are packed into
pinned staging buffers and copied to device buffers with non-blocking copies on a side stream;
two sets of buffers are used in turn, so the host writes set ``i % 2`` while set ``i - 1`` may
still be in flight. The host waits only if the copy from two steps ago has not finished (an
event query, normally already done). The compute stream waits on the upload's event, never the
host. Needs torch with CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from hybridkv.manager.step_tables import StepTables


class _SideStreamUpload:
    """What both uploaders share: a side stream, two staging buffers used in turn, and the
    handshake around them — before refilling buffer ``i`` the host waits for the copy that
    last read it (two steps ago, normally long done); after issuing the copy the compute
    stream, not the host, waits for it. Optional GPU-timeline timing (``timing = True``):
    the measured intervals land in ``gpu_ms``."""

    timing = False

    def _init_stream(self, device: str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device)
        self._events = [torch.cuda.Event(), torch.cuda.Event()]
        self._used = [False, False]
        self.step = 0

    def _next_buffer(self) -> int:
        """The staging buffer this step may fill, once its previous copy has finished."""
        i = self.step % 2
        self.step += 1
        if self._used[i]:
            self._events[i].synchronize()
        return i

    @contextmanager
    def _on_side_stream(self, i: int) -> Iterator[None]:
        """Issue the copies of buffer ``i`` on the side stream; the compute stream waits."""
        with torch.cuda.stream(self.stream):
            start = self._timer_start()
            yield
            self._events[i].record(self.stream)
            self._timer_stop(start)
        self._used[i] = True
        torch.cuda.current_stream(self.device).wait_event(self._events[i])

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


class PageTableUploader(_SideStreamUpload):
    """Double-buffered, pinned, non-blocking upload of a step's block tables."""

    def __init__(self, num_layer_groups: int, max_rows: int, max_width: int, device: str = "cuda") -> None:
        self._init_stream(device)
        n = num_layer_groups * max_rows * max_width + max_rows
        self._host = [torch.empty(n, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self._dev = [torch.empty(n, dtype=torch.int32, device=self.device) for _ in range(2)]
        self.num_layer_groups, self.max_rows, self.max_width = num_layer_groups, max_rows, max_width

    def upload(self, tables: StepTables) -> tuple[list[Any], Any]:
        """Device tensors ``([table per layer group], seq_lens)`` for this step. The compute
        stream is made to wait for them; the host returns at once."""
        i = self._next_buffer()
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
        with self._on_side_stream(i):
            dev[:total].copy_(self._host[i][:total], non_blocking=True)
        out = [dev[o:o + int(np.prod(s))].view(*s) for o, s in shapes]
        return out, dev[offset:total]


class TableMirror(_SideStreamUpload):
    """A GPU copy of the manager's block tables, patched every step from its change log.

    A decode step changes a few entries per request per block boundary, so ``sync()`` ships
    only (entry, slot) pairs plus ``seq_lens``: packed into one pinned staging buffer (two in
    turn), one non-blocking copy and one scatter on a side stream. All layer groups' tables
    and ``seq_lens`` live in one flat device int32 buffer, so a step is two launches whatever
    the number of groups. The compute stream waits on an event; the host never does (unless
    the staging buffer from two steps ago is still in flight). Device tables are full width
    ``[max_rows, max_blocks]``; ``tables(n)`` returns views of the first ``n`` rows, i.e. the
    batch of ``manager.active_handles()``.
    """

    def __init__(self, manager: Any, device: str = "cuda", capacity: int = 1 << 16) -> None:
        self.rows = manager.rows
        self._init_stream(device)
        sizes = [t.size for t in self.rows.tables]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._seq_off = int(self._offsets[-1])
        flat = np.concatenate([t.ravel() for t in self.rows.tables] + [self.rows.seq_lens])
        self.flat = torch.from_numpy(flat).to(self.device)
        self.seq_lens = self.flat[self._seq_off:]
        self.dev = [self.flat[int(self._offsets[g]):int(self._offsets[g + 1])].view(t.shape)
                    for g, t in enumerate(self.rows.tables)]
        self.rows.log = []
        self._capacity = 0
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        self._capacity = capacity
        self._staging = [torch.empty(capacity * 12, dtype=torch.uint8, pin_memory=True) for _ in range(2)]

    def _pack(self) -> tuple[np.ndarray, np.ndarray]:
        """Flat entry indices and values (table changes, then seq_lens); the last write of an
        entry wins, so one scatter applies them in any order."""
        log, self.rows.log = self.rows.log or [], []
        width = [t.shape[1] for t in self.rows.tables]
        n = self.rows.n
        idx = [self._offsets[c.layer_group] + c.rows * width[c.layer_group] + c.cols for c in log]
        idx.append(self._seq_off + np.arange(n, dtype=np.int64))
        val = [c.slots for c in log] + [self.rows.seq_lens[:n]]
        flat_idx, flat_val = np.concatenate(idx), np.concatenate(val).astype(np.int32)
        if len(log) > 1:
            _, last = np.unique(flat_idx[::-1], return_index=True)
            keep = flat_idx.size - 1 - last
            flat_idx, flat_val = flat_idx[keep], flat_val[keep]
        return flat_idx, flat_val

    def sync(self) -> None:
        """Ship this step's table changes and seq_lens; the compute stream waits for them."""
        i = self._next_buffer()
        idx, val = self._pack()
        k = idx.size
        if k > self._capacity:
            torch.cuda.synchronize(self.device)
            self._grow(max(k, 2 * self._capacity))
        host = self._staging[i].numpy()
        host[:8 * k].view(np.int64)[:] = idx
        host[8 * k:12 * k].view(np.int32)[:] = val
        with self._on_side_stream(i):
            dev = self._staging[i][:12 * k].to(self.device, non_blocking=True)
            self.flat.index_copy_(0, dev[:8 * k].view(torch.int64), dev[8 * k:].view(torch.int32))

    def tables(self, n: int | None = None) -> list[Any]:
        n = self.rows.n if n is None else n
        return [t[:n] for t in self.dev]
