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


class PageTableUploader:
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
            dev[:total].copy_(self._host[i][:total], non_blocking=True)
            self._events[i].record(self.stream)
        self._used[i] = True
        torch.cuda.current_stream(self.device).wait_event(self._events[i])
        out = [dev[o:o + int(np.prod(s))].view(*s) for o, s in shapes]
        return out, dev[offset:total]
