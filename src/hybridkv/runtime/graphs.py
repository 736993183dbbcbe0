"""Decode steps replayed from CUDA graphs.

A decode step of a 1B model reads a few GB on the GPU, a millisecond or two, while the host
spends several milliseconds walking transformers' modules and launching two kernels per
layer. A graph captured once per batch size replays the whole forward in one launch.

A graph runs on fixed addresses, so a step's inputs are copied into static buffers::

    ids, positions, rows,  [size]           the step's n tokens, then padding tokens
    pending sources
    kv_len                 [rows + 1]       each row's tokens; the last row (the padding row) 0
    family tables          [rows + 1, W, m] the step's tables in the first rows; the padding
                                            row all -1, W the family's widest table

A step of ``n`` tokens replays the graph of the smallest captured size ``>= n``: its padding
tokens sit in the padding row, whose table has no page, so the write kernel skips them
(``engine/triton_write.py``) and attention gives them zeros that no one reads. Tiles and
splits depend on shapes only (``triton_attention.choose_tiles``), so the launch a graph
recorded is the one the step needs. Graphs are captured lazily, the first time a size is
needed, into one memory pool: a replay's logits are read before the next replay.

A token sampled by the step before, which the host has not read yet (overlapped steps), is
filled in by the graph itself from the sampler's fixed ``sampled`` buffer
(``packing.fill_pending``). The host fills page-locked staging copies of the buffers and
uploads each in one asynchronous copy; there are two sets of them, taken in turn, so the host
fills one while the copy from the other may still wait behind the step in flight.

A capture that fails (a module that reads the device on the host, say) raises when the
engine asked for graphs (``decode_graphs="capture"``); under ``"auto"`` it is recorded in
``failed`` and the static step runs eagerly from then on.

With recurrent layers (``state_families``) the static step runs each one once for the batch
(``recurrent.py``), the states gathered and scattered by slot on the device. A padding row
cannot write into the padding row's "no page": its table row in a state family points at a
spare slot, one that none of the step's rows holds, chosen on the host each step, and it
writes back what that slot holds. A step with a request at position 0 (no state yet) runs
without the graph.

``capture=False`` runs the same padded static step eagerly: the CPU tests prove the buffers
and padding with the torch kernels; the GPU proves the captured replay against it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hybridkv.runtime.attention import STEP_KEYWORD, PagedAttention, StepContext
from hybridkv.runtime.packing import HostStep, fill_pending
from hybridkv.runtime.pages import LayerPages

if TYPE_CHECKING:
    import torch

    from hybridkv.engine.triton_write import WriteKV


def graph_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Batch sizes captured: 1, 2, 4, 8, then every 16 up to ``max_batch_size`` (and it)."""
    sizes = {s for s in (1, 2, 4, 8) if s < max_batch_size} | set(range(16, max_batch_size, 16))
    return tuple(sorted(sizes | {max_batch_size}))


def failed_at(error: BaseException) -> str:
    """`` in F (file:line)``: the innermost frame of ``error``'s traceback outside the torch
    package (the model's or transformers' code that did what a capture cannot), or ``""``."""
    import contextlib
    import os
    import traceback

    import torch

    torch_dir = os.path.dirname(torch.__file__) + os.sep  # (by package, not by a path's words)
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith(torch_dir) and f.filename != contextlib.__file__]
    if not frames:
        return ""
    f = frames[-1]
    return f" in {f.name} ({'/'.join(f.filename.split('/')[-2:])}:{f.lineno})"


class DecodeGraphs:
    """The model's decode forward over static buffers, one CUDA graph per padded batch size."""

    def __init__(self, model: Any, layers: dict[int, LayerPages], family_tables: list[Any],
                 members: list[tuple[int, ...]], num_groups: int, max_rows: int, kernel: PagedAttention,
                 write: WriteKV, device: str, sampled: torch.Tensor, capture: bool, strict: bool = True,
                 state_families: dict[int, int] | None = None) -> None:
        import torch

        self.model, self.layers, self.kernel, self.write = model, layers, kernel, write
        self.capture, self.strict, self.sampled = capture, strict, sampled
        # families of recurrent states -> their pool's slots: the padding row points at a spare
        # slot each step (``spares``)
        self.state_families = state_families or {}
        self.failed: str | None = None  # why capturing failed (not strict: the static step runs eagerly)
        self.sizes = graph_sizes(max_rows)
        self.max_rows = max_rows
        size = self.sizes[-1]
        # inputs [4, size]: ids, positions, rows, pending sources (padding tokens in the
        # padding row, max_rows, with no pending source)
        self.inputs = torch.zeros(4, size, dtype=torch.long, device=device)
        self.ids, self.q_pos, self.q_row, self.src = self.inputs
        self.q_row.fill_(max_rows)
        self.src.fill_(-1)
        self.kv_len = torch.zeros(max_rows + 1, dtype=torch.long, device=device)
        # per family [rows + 1, widest table, members], -1 everywhere (the padding row stays so)
        self.families = [torch.full((max_rows + 1, t.shape[1], t.shape[2]), -1, dtype=torch.int32, device=device)
                         for t in family_tables]
        # the same on the host, page-locked on a GPU, two sets (whole rows of a family's table
        # are contiguous: one copy per family)
        pinned = torch.device(device).type == "cuda"
        self.stages = [[torch.zeros(t.shape, dtype=t.dtype, pin_memory=pinned) for t in (self.inputs, self.kv_len)]
                       + [torch.full(t.shape, -1, dtype=torch.int32, pin_memory=pinned) for t in self.families]
                       for _ in range(2)]
        self.turn = 0
        per_group: list[Any] = [None] * num_groups
        for table, group_ids in zip(self.families, members, strict=True):
            for j, g in enumerate(group_ids):
                per_group[g] = table[:, :, j]
        self.tables = tuple(per_group)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None

    def reset(self) -> None:
        """Drop every captured graph and their memory pool (the next step of each size
        captures again: after the model's modules changed, say). Call it between steps, with no
        replay in flight; torch frees a pool with its last graph, so a new one is taken."""
        self.graphs.clear()
        self.pool = None
        self.capture, self.failed = self.capture or self.failed is not None, None

    def fits(self, host: HostStep) -> bool:
        """Can this step replay a graph: a decode step within the captured sizes and widths?"""
        return (host.is_decode and host.ids.size <= self.sizes[-1] and host.kv_len.size <= self.max_rows
                and all(h.shape[1] <= s.shape[1] for h, s in zip(host.families, self.families, strict=True))
                and (not self.state_families or (bool((host.q_pos > 0).all())  # states exist
                                                 and all(s < self.state_families[f] for f, s in self.spares(host)))))

    def spares(self, host: HostStep) -> list[tuple[int, int]]:
        """Per state family, the smallest slot id that no row of the step holds: where padding
        rows read and write back (past the pool's slots when every slot is held: no graph)."""
        out = []
        for f in self.state_families:
            used = host.families[f][host.families[f] >= 0]
            out.append((f, int(np.setdiff1d(np.arange(used.size + 1), used)[0])))
        return out

    def _forward(self, size: int) -> torch.Tensor:
        ctx = StepContext(self.q_row[:size], self.q_pos[:size], self.kv_len, self.tables, self.layers, (),
                          self.kernel, self.write, decode=bool(self.state_families))
        ids = fill_pending(self.ids[:size], self.src[:size], self.sampled)
        out = self.model(input_ids=ids[None], position_ids=self.q_pos[None, :size], use_cache=False,
                         logits_to_keep=0, **{STEP_KEYWORD: ctx})
        logits: torch.Tensor = out.logits[0]
        return logits

    def _capture(self, size: int) -> None:
        """Warm up (compiles the kernels) and capture ``size`` over padding tokens only: no
        page is written while capturing."""
        import torch

        self.q_row[:size].fill_(self.max_rows)
        self.ids[:size].zero_()
        self.src[:size].fill_(-1)
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
                self.capture, self.failed = False, (f"capturing batch {size} failed{failed_at(e)}: "
                                                    f"{type(e).__name__}: {e}")
        rows = host.kv_len.size
        stage = self.stages[self.turn]
        self.turn = 1 - self.turn
        inputs, kv_len = stage[0].numpy(), stage[1].numpy()
        inputs[0, :n], inputs[1, :n], inputs[2, :n] = host.ids, host.q_pos, host.q_row
        inputs[3, :n] = -1 if host.src is None else host.src
        inputs[0, n:size], inputs[1, n:size], inputs[2, n:size], inputs[3, n:size] = 0, 0, self.max_rows, -1
        kv_len[:rows] = host.kv_len  # (kv_len[max_rows], the padding row's, stays 0)
        self.inputs.copy_(stage[0], non_blocking=True)
        self.kv_len.copy_(stage[1], non_blocking=True)
        for static, staged, table in zip(self.families, stage[2:], host.families, strict=True):
            staged.numpy()[:rows, :table.shape[1]] = table
            static[:rows].copy_(staged[:rows], non_blocking=True)
        for f, spare in self.spares(host):
            # padding rows gather a state slot that no row of the step writes, and write back
            # what it holds (recurrent.py)
            pad_row = stage[2 + f].numpy()[self.max_rows]
            pad_row[:] = -1
            pad_row[0] = spare
            self.families[f][self.max_rows].copy_(stage[2 + f][self.max_rows], non_blocking=True)
        if not self.capture:
            with torch.no_grad():
                return self._forward(size)[:n]
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n]
