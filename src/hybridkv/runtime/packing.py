"""A step's tokens packed into one sequence, on the host and then on the device.

``pack`` turns the scheduler's ``StepPlan`` into a ``HostStep``: every running request's new
tokens one after another (batch 1), each token's batch row and position in its request, the
tokens each row sees after the step, the family tables, and which packed tokens sample the
next token. ``upload`` puts it on the device for the plain (not graph-replayed) forward.

A request's last token may still be on the device: with overlapped steps the host packs step
``k + 1`` before it has read the tokens step ``k`` sampled. Such a token is ``PENDING`` in the
request's array; ``HostStep.src`` says, per packed token, which of the in-flight step's
sampled tokens it is (-1: its id is in ``ids``), and ``fill_pending`` puts them in on the
device, in stream order after the step that sampled them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from hybridkv.runtime.requests import GenRequest

if TYPE_CHECKING:
    import torch

    from hybridkv.scheduler.scheduler import StepPlan


class HostStep(NamedTuple):
    """One step's packed tokens on the host."""

    ids: npt.NDArray[np.int64]  # [T] token ids (PENDING where src says which in-flight token)
    q_row: npt.NDArray[np.int64]  # [T] batch row of each token
    q_pos: npt.NDArray[np.int64]  # [T] its position in its request
    kv_len: npt.NDArray[Any]  # [R] tokens each row sees after the step
    families: tuple[npt.NDArray[np.int32], ...]  # per family [R, width, members]
    emit_at: npt.NDArray[np.int64]  # packed indices whose logits are sampled
    rows: npt.NDArray[np.int64]  # their batch rows
    runs: tuple[tuple[int, int, int], ...]  # (row, first, end) of each request's tokens
    emitting: tuple[GenRequest, ...]  # the requests sampling a token, in emit_at's order
    src: npt.NDArray[np.int64] | None = None  # [T] index into the in-flight step's tokens, or -1

    @property
    def is_decode(self) -> bool:
        """One token per row, each sampled: the step a graph replays."""
        return self.emit_at.size == self.ids.size and bool(np.array_equal(self.rows, self.q_row))

    @property
    def emit_positions(self) -> npt.NDArray[np.int64]:
        """The position of each sampled token in its request."""
        return self.q_pos[self.emit_at] + 1


def pack(step: StepPlan, request_at: Callable[[int], GenRequest], num_families: int, needs_runs: bool,
         in_flight: dict[int, int]) -> HostStep:
    """The packed tokens of ``step`` (``request_at(i)``: the request on row ``i``);
    ``in_flight``: request id -> index of its token among the in-flight step's samples."""
    assert step.tables is not None
    live = np.flatnonzero(step.num_tokens > 0)
    lo, hi = step.history[live].astype(np.int64), step.capacity[live].astype(np.int64)
    counts = hi - lo
    ends = np.cumsum(counts)
    starts = ends - counts
    reqs = [request_at(i) for i in live.tolist()]
    ids = np.concatenate([r.tokens[a:b] for r, a, b in zip(reqs, lo.tolist(), hi.tolist(), strict=True)])
    # a request whose step computes its last known token samples the next one
    emits = hi == np.fromiter((r.known for r in reqs), np.int64, len(reqs))
    src = None
    if in_flight:
        # a pending token is a request's last known one: in this step iff the step emits
        slot = np.fromiter((in_flight.get(r.request_id, -1) for r in reqs), np.int64, len(reqs))
        pending = emits & (slot >= 0)
        if pending.any():
            src = np.full(int(ends[-1]), -1, np.int64)
            src[ends[pending] - 1] = slot[pending]
    runs = tuple(zip(live.tolist(), starts.tolist(), ends.tolist(), strict=True)) if needs_runs else ()
    families = tuple(step.tables.family_table(i) for i in range(num_families))
    return HostStep(ids.astype(np.int64), np.repeat(live, counts),
                    np.arange(int(ends[-1])) - np.repeat(starts - lo, counts), step.capacity, families,
                    (ends - 1)[emits], live[emits], runs,
                    tuple(r for r, e in zip(reqs, emits.tolist(), strict=True) if e), src)


def to_device(array: npt.NDArray[Any], device: Any) -> torch.Tensor:
    """``array`` on ``device`` without waiting for the device: through page-locked memory on
    a GPU (an upload from pageable memory waits for the stream's queued work first)."""
    import torch

    host = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def fill_pending(ids: torch.Tensor, src: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """``ids`` with each token whose ``src >= 0`` replaced by ``sampled[src]`` (no host read)."""
    import torch

    return torch.where(src >= 0, sampled[src.clamp(min=0)], ids)


class DeviceStep(NamedTuple):
    """``HostStep`` on the device (``upload``), with the host tables for per-request work."""

    ids: torch.Tensor
    q_row: torch.Tensor
    q_pos: torch.Tensor
    kv_len: torch.Tensor
    emit_at: torch.Tensor
    tables: tuple[Any, ...]  # per layer group [R, W] int32, a view of its family's upload
    host_tables: tuple[Any, ...]


def upload(host: HostStep, members: Sequence[tuple[int, ...]], num_groups: int, device: Any,
           sampled: torch.Tensor | None) -> DeviceStep:
    """The step on the device: ids (pending ones filled from ``sampled``, the in-flight
    step's tokens), rows, positions, and one upload per family (a life cycle's layer groups
    in one pool: an arena's page-sized groups, a state's slices)."""
    per_group: list[Any] = [None] * num_groups
    per_group_host: list[Any] = [None] * num_groups
    for group_ids, host_table in zip(members, host.families, strict=True):
        table = np.ascontiguousarray(host_table)
        both = to_device(table, device)
        for j, g in enumerate(group_ids):
            per_group[g], per_group_host[g] = both[:, :, j], table[:, :, j]
    tokens = to_device(np.stack([host.ids, host.q_row, host.q_pos]), device)
    ids = tokens[0]
    if host.src is not None:
        assert sampled is not None, "a pending token without the step that sampled it"
        ids = fill_pending(ids, to_device(host.src, device), sampled)
    return DeviceStep(ids, tokens[1], tokens[2], to_device(host.kv_len.astype(np.int64), device),
                      to_device(host.emit_at, device), tuple(per_group), tuple(per_group_host))
