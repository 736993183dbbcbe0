"""Decode steps replayed from CUDA graphs.

A decode step of a 1B model reads a few GB on the GPU, a millisecond or two, while the host
spends several milliseconds walking transformers' modules and launching two kernels per
layer. A graph captured once per batch size replays the whole forward in one launch.

A graph runs on fixed addresses, so a step's inputs are copied into static buffers::

    ids, positions, rows   [size]           the step's n tokens, then padding tokens
    kv_len                 [rows + 1]       each row's tokens; the last row (the padding row) 0
    family tables          [rows + 1, W, m] the step's tables in the first rows; the padding
                                            row all -1, W the family's widest table

A step of ``n`` tokens replays the graph of the smallest captured size ``>= n``: its padding
tokens sit in the padding row, whose table has no page, so the write kernel skips them
(``engine/triton_write.py``) and attention gives them zeros that no one reads. Tiles and
splits depend on shapes only (``triton_attention.choose_tiles``), so the launch a graph
recorded is the one the step needs. Graphs are captured lazily, the first time a size is
needed, into one memory pool: a replay's logits are read before the next replay.

A capture that fails (a module that reads the device on the host, say) raises when the
engine asked for graphs (``decode_graphs="capture"``); under ``"auto"`` it is recorded in
``failed`` and the static step runs eagerly from then on.

``capture=False`` runs the same padded static step eagerly: the CPU tests prove the buffers
and padding with the torch kernels; the GPU proves the captured replay against it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from hybridkv.runtime.attention import STEP_KEYWORD, PagedAttention, StepContext
from hybridkv.runtime.pages import LayerPages
from hybridkv.runtime.requests import GenRequest

if TYPE_CHECKING:
    import torch

    from hybridkv.engine.triton_write import WriteKV


class HostStep(NamedTuple):
    """One step's packed tokens on the host (``Engine._pack``)."""

    ids: npt.NDArray[np.int64]  # [T] token ids
    q_row: npt.NDArray[np.int64]  # [T] batch row of each token
    q_pos: npt.NDArray[np.int64]  # [T] its position in its request
    kv_len: npt.NDArray[Any]  # [R] tokens each row sees after the step
    families: tuple[npt.NDArray[np.int32], ...]  # per family [R, width, members]
    emit_at: npt.NDArray[np.int64]  # packed indices whose logits are sampled
    rows: npt.NDArray[np.int64]  # their batch rows
    runs: tuple[tuple[int, int, int], ...]  # (row, first, end) of each request's tokens
    emitting: tuple[GenRequest, ...]  # the requests sampling a token, in emit_at's order

    @property
    def is_decode(self) -> bool:
        """One token per row, each sampled: the step a graph replays."""
        return self.emit_at.size == self.ids.size and bool(np.array_equal(self.rows, self.q_row))


def graph_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Batch sizes captured: 1, 2, 4, 8, then every 16 up to ``max_batch_size`` (and it)."""
    sizes = {s for s in (1, 2, 4, 8) if s < max_batch_size} | set(range(16, max_batch_size, 16))
    return tuple(sorted(sizes | {max_batch_size}))


class DecodeGraphs:
    """The model's decode forward over static buffers, one CUDA graph per padded batch size."""

    def __init__(self, model: Any, layers: dict[int, LayerPages], family_tables: list[Any],
                 members: list[tuple[int, ...]], num_groups: int, max_rows: int, kernel: PagedAttention,
                 write: WriteKV, device: str, capture: bool, strict: bool = True) -> None:
        import torch

        self.model, self.layers, self.kernel, self.write = model, layers, kernel, write
        self.capture, self.strict = capture, strict
        self.failed: str | None = None  # why capturing failed (not strict: the static step runs eagerly)
        self.sizes = graph_sizes(max_rows)
        self.max_rows = max_rows
        size = self.sizes[-1]
        # inputs [3, size]: ids, positions, rows (padding tokens in the padding row, max_rows)
        self.inputs = torch.zeros(3, size, dtype=torch.long, device=device)
        self.ids, self.q_pos, self.q_row = self.inputs
        self.q_row.fill_(max_rows)
        self.kv_len = torch.zeros(max_rows + 1, dtype=torch.long, device=device)
        # per family [rows + 1, widest table, members], -1 everywhere (the padding row stays so)
        self.families = [torch.full((max_rows + 1, t.shape[1], t.shape[2]), -1, dtype=torch.int32, device=device)
                         for t in family_tables]
        # the same on the host, page-locked on a GPU: a step fills them and uploads each in one
        # asynchronous copy (whole rows of a family's table are contiguous)
        pinned = torch.device(device).type == "cuda"
        self.stage = [torch.empty_like(t, device="cpu", pin_memory=pinned) for t in (self.inputs, self.kv_len)]
        self.stage_families = [torch.full(t.shape, -1, dtype=torch.int32, pin_memory=pinned) for t in self.families]
        self.stage[1].zero_()
        per_group: list[Any] = [None] * num_groups
        for table, group_ids in zip(self.families, members, strict=True):
            for j, g in enumerate(group_ids):
                per_group[g] = table[:, :, j]
        self.tables = tuple(per_group)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None

    def fits(self, host: HostStep) -> bool:
        """Can this step replay a graph: a decode step within the captured sizes and widths?"""
        return (host.is_decode and host.ids.size <= self.sizes[-1] and host.kv_len.size <= self.max_rows
                and all(h.shape[1] <= s.shape[1] for h, s in zip(host.families, self.families, strict=True)))

    def _forward(self, size: int) -> torch.Tensor:
        ctx = StepContext(self.q_row[:size], self.q_pos[:size], self.kv_len, self.tables, self.layers, (),
                          self.kernel, self.write)
        out = self.model(input_ids=self.ids[None, :size], position_ids=self.q_pos[None, :size], use_cache=False,
                         logits_to_keep=0, **{STEP_KEYWORD: ctx})
        logits: torch.Tensor = out.logits[0]
        return logits

    def _capture(self, size: int) -> None:
        """Warm up (compiles the kernels) and capture ``size`` over padding tokens only: no
        page is written while capturing."""
        import torch

        self.q_row[:size].fill_(self.max_rows)
        with torch.no_grad():
            self._forward(size)
            torch.cuda.synchronize()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._forward(size)
        self.graphs[size] = (graph, logits)

    def run(self, host: HostStep) -> torch.Tensor:
        """The step's logits ``[n, vocab]`` (a view of the graph's output: read it before the
        next step)."""
        import torch

        n = host.ids.size
        size = next(s for s in self.sizes if s >= n)
        if self.capture and size not in self.graphs:
            try:
                self._capture(size)
            except Exception as e:  # a module that cannot be captured (a host sync, say)
                if self.strict:
                    raise
                self.capture, self.failed = False, f"capturing batch {size} failed: {type(e).__name__}: {e}"
        rows = host.kv_len.size
        inputs, kv_len = (t.numpy() for t in self.stage)
        inputs[0, :n], inputs[1, :n], inputs[2, :n] = host.ids, host.q_pos, host.q_row
        inputs[0, n:size], inputs[1, n:size], inputs[2, n:size] = 0, 0, self.max_rows
        kv_len[:rows] = host.kv_len  # (kv_len[max_rows], the padding row's, stays 0)
        self.inputs.copy_(self.stage[0], non_blocking=True)
        self.kv_len.copy_(self.stage[1], non_blocking=True)
        for static, stage, table in zip(self.families, self.stage_families, host.families, strict=True):
            stage.numpy()[:rows, :table.shape[1]] = table
            static[:rows].copy_(stage[:rows], non_blocking=True)
        if not self.capture:
            with torch.no_grad():
                return self._forward(size)[:n]
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n]
