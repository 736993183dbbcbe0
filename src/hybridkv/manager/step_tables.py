"""What a step hands the engine: per layer group, page tables its attention kernels read.

- ``block_table(g)``: FlashAttention / vLLM style ``[batch, max_blocks]`` int32, entry ``b``
  = slot of block ordinal ``b`` (``NULL_SLOT`` where a window block was released), with
  ``seq_lens`` (int32 capacity per request). When the batch is the active rows in row order
  (``manager.active_handles()``), it is a zero-copy view of the manager's table.
- ``family_table(i)``: the tables of family ``i`` (``ActiveRows.families``: the layer
  groups of one life cycle in one pool group, e.g. the page-sized parts of a life cycle in a
  shared arena) as one ``[batch, max_blocks, members]`` array: member ``j``'s table is
  ``[:, :, j]``, so an engine hands its kernels one table per family per step.
- ``paged(g)``: FlashInfer style ``(indptr, indices, last_page_len)`` listing each request's
  *live* pages in block order (sink pages, then the window): built on demand.

Views are valid until the manager's next state change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt

from hybridkv.manager.rows import NULL_SLOT

if TYPE_CHECKING:
    from hybridkv.manager.rows import ActiveRows

I32 = npt.NDArray[np.int32]


class PagedView(NamedTuple):
    """FlashInfer-style paged KV description for one layer group and one batch."""

    indptr: I32  # [batch + 1]: request i's pages are indices[indptr[i]:indptr[i+1]]
    indices: I32  # slot ids of live pages, block order
    last_page_len: I32  # tokens in each request's last page (1..tpb; 0 for an empty request)


class StepTables:
    """Page tables for one batch (``rows`` of the manager's active state)."""

    def __init__(self, state: ActiveRows, rows: npt.NDArray[np.int64], tokens_per_block: int) -> None:
        self._state = state
        self._tpb = tokens_per_block
        self.rows = rows
        n = rows.size
        # rows 0..n-1 in order: the manager's arrays are already the batch's arrays
        self._contiguous = n == 0 or (int(rows[0]) == 0 and int(rows[-1]) == n - 1
                                      and (n == 1 or bool((np.diff(rows) == 1).all())))
        self.seq_lens: I32 = state.seq_lens[:n] if self._contiguous else state.seq_lens[rows]

    def __len__(self) -> int:
        return int(self.rows.size)

    def block_table(self, layer_group: int) -> I32:
        """``[batch, width]`` int32 slot ids; width covers the longest request of the batch."""
        table = self._state.tables[layer_group]
        longest = int(self.seq_lens.max()) if self.rows.size else 0
        width = self._state.life_cycles[layer_group].width_at(longest, self._tpb)
        if self._contiguous:
            return table[:self.rows.size, :width]
        out: I32 = table[self.rows, :width]
        return out

    def family_table(self, family: int) -> npt.NDArray[np.int32]:
        """``[batch, width, members]`` int32 slot ids of one family (zero-copy as above)."""
        f = self._state.families[family]
        longest = int(self.seq_lens.max()) if self.rows.size else 0
        width = f.life_cycle.width_at(longest, self._tpb)
        if self._contiguous:
            return f.table[:self.rows.size, :width]
        out: npt.NDArray[np.int32] = f.table[self.rows, :width]
        return out

    def paged(self, layer_group: int) -> PagedView:
        table = self.block_table(layer_group)
        live = table != NULL_SLOT
        counts = live.sum(axis=1, dtype=np.int64)
        indptr = np.zeros(self.rows.size + 1, np.int32)
        np.cumsum(counts, out=indptr[1:])
        last = self._state.life_cycles[layer_group].last_page_tokens(self.seq_lens, self._tpb)
        return PagedView(indptr, table[live].astype(np.int32), last.astype(np.int32))
