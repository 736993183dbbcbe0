"""Recurrent layers' states in pages: where each byte of a (layer, buffer) state lives.

A state life cycle's slot holds one state per request. With per-lifecycle pools a layer's
state buffer is one page of its layer group's slot; in a shared arena a big state is cut into
page-sized *slices*, each slice a layer group of its own with its own table, and a buffer may
straddle two slices (``PageSpec.start`` is the part's first byte within the buffer)::

    layer 5's ssm state (bytes):  | 0 ........ 700 | 700 ........... 1024 |
    held by:                        slice group 3     slice group 4
                                    slot T3[row, 0]   slot T4[row, 0]
                                    at offset 324     at offset 0

``gather`` copies the parts of a request's state into one contiguous tensor, ``scatter``
writes it back; both go through the step's tables (``table[row, 0]`` is a state group's slot;
the engine passes its host copies, so reading a slot never waits on the device).
``gather_rows`` / ``scatter_rows`` do the same for many rows at once, reading the slots from
the device tables on the device (a decode step's batched recurrent update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hybridkv.core.errors import InvariantError
from hybridkv.core.types import LayerGroupId
from hybridkv.manager.manager import KVCacheManager
from hybridkv.runtime.pages import buffer_tensor
from hybridkv.storage.pages import page_specs

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class StatePart:
    """Bytes ``[start, start + nbytes)`` of a state buffer: ``pages[slot]`` of layer group ``layer_group``."""

    layer_group: int
    start: int
    nbytes: int
    pages: torch.Tensor  # uint8 [num_slots, nbytes], a strided view of the pool buffer


@dataclass(frozen=True, slots=True)
class StateBuffer:
    """One state buffer ("conv", "ssm") of one layer: its size and its parts in byte order."""

    nbytes: int
    parts: tuple[StatePart, ...]

    def gather(self, tables: tuple[Any, ...], row: int) -> torch.Tensor:
        """The row's state as one uint8 tensor of ``nbytes``."""
        import torch

        return torch.cat([part.pages[self._slot(tables, part, row)] for part in self.parts])

    def scatter(self, tables: tuple[Any, ...], row: int, data: torch.Tensor) -> None:
        """Write ``data`` (any dtype, ``nbytes`` in all) into the row's state pages."""
        flat = data.contiguous().view(-1).view(dtype=_uint8())
        if flat.numel() != self.nbytes:
            raise InvariantError(f"a state of {flat.numel()} B written into a buffer of {self.nbytes} B")
        for part in self.parts:
            part.pages[self._slot(tables, part, row)] = flat[part.start:part.start + part.nbytes]

    def gather_rows(self, tables: tuple[torch.Tensor, ...], rows: torch.Tensor) -> torch.Tensor:
        """Many rows' states at once, ``[len(rows), nbytes]`` uint8, the slots read from the
        device ``tables`` by the device ``rows`` (no host read; the caller checked the slots)."""
        import torch

        return torch.cat([part.pages[tables[part.layer_group][rows, 0].long()] for part in self.parts], dim=1)

    def scatter_rows(self, tables: tuple[torch.Tensor, ...], rows: torch.Tensor, data: torch.Tensor,
                     keep: torch.Tensor | None = None) -> None:
        """Write ``data`` (``[len(rows), ...]``, ``nbytes`` per row) into the rows' state pages
        (distinct rows hold distinct state slots). ``keep``: rows (True) that write back what
        their slot holds instead, so padding rows may share a spare slot no other row writes."""
        import torch

        flat = data.contiguous().view(data.shape[0], -1).view(dtype=_uint8())
        if flat.shape[1] != self.nbytes:
            raise InvariantError(f"a state of {flat.shape[1]} B written into a buffer of {self.nbytes} B")
        for part in self.parts:
            slots = tables[part.layer_group][rows, 0].long()
            new = flat[:, part.start:part.start + part.nbytes]
            if keep is not None:
                new = torch.where(keep[:, None], part.pages[slots], new)
            part.pages[slots] = new

    def check_rows(self, host_tables: tuple[Any, ...], rows: Any) -> None:
        """Every row of ``rows`` (host indices) holds a page of every part."""
        for part in self.parts:
            if (host_tables[part.layer_group][rows, 0] < 0).any():
                raise InvariantError(f"layer group {part.layer_group}: a row of {list(rows)} holds no state page")

    @staticmethod
    def _slot(tables: tuple[Any, ...], part: StatePart, row: int) -> int:
        slot = int(tables[part.layer_group][row, 0])
        if slot < 0:
            raise InvariantError(f"layer group {part.layer_group}: row {row} holds no state page")
        return slot


def _uint8() -> torch.dtype:
    import torch

    return torch.uint8


def state_buffers(manager: KVCacheManager, layer_ids: set[int]) -> dict[int, dict[str, StateBuffer]]:
    """Per recurrent layer in ``layer_ids``, its state buffers by name."""
    grouped = manager.grouped
    parts: dict[tuple[int, str], list[StatePart]] = {}
    for lg in grouped.layer_groups:
        tensor = buffer_tensor(manager, lg.pool_group)
        for spec in page_specs(grouped, LayerGroupId(lg.id)):
            if spec.layer_id in layer_ids and not spec.bytes_per_token:
                pages = tensor[:, spec.offset:spec.offset + spec.page_bytes]
                parts.setdefault((spec.layer_id, spec.buffer), []).append(
                    StatePart(lg.id, spec.start, spec.page_bytes, pages))
    out: dict[int, dict[str, StateBuffer]] = {}
    for (layer_id, name), found in parts.items():
        found.sort(key=lambda p: p.start)
        size = next(b.state_bytes for b in grouped.layout.layers[layer_id].buffers if b.name == name)
        starts = [sum(p.nbytes for p in found[:i]) for i in range(len(found) + 1)]
        if [p.start for p in found] != starts[:-1] or starts[-1] != size:
            raise InvariantError(f"layer {layer_id} buffer {name!r}: its parts do not tile its {size} B")
        out.setdefault(layer_id, {})[name] = StateBuffer(size, tuple(found))
    return out
