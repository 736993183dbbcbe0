"""Dead entries: cached blocks no match can use now, evicted before any live one.

A cached block is only as useful as the groups that serve the same matches with it. Block
``o`` of group ``h`` serves the matches ``LifeCycle.serves(o)``. If another group ``m``
keyed by the same prompt lacks the same key, and every match ``h``'s block serves also needs
``m``'s (``serves_h(o)`` inside ``serves_m(o)``), no match can use ``h``'s block now: it is
*dead*.

What this buys:
- A full-attention block dropped at the tip of a chain takes the window and state pages under
  its key with it. Window groups lose their *oldest* blocks first and full ones their
  *deepest*, so without this they would eat a chain from both ends and leave both halves
  useless.
- A window block dropped takes the state snapshot after it.
- One slice of a state taken from the cache takes the other slices.

An entry stays dead only while the block that killed it is missing: a publish that brings it
back revives it. The rule is per key: entries deeper in a chain behind a missing
full-attention block are not marked (the full group's deepest-first order reaches them first).

``DeadEntries`` keeps the flags of one ``EntryTable`` (its ``dead`` column). The index tells
it which keys gained or lost entries; ``settle`` recomputes the flags under those keys and
returns the rows whose flag changed (their eviction keys changed).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from hybridkv.core.types import LayerGroupId
from hybridkv.lifecycles import LifeCycle
from hybridkv.reuse.entries import EntryTable

I64 = npt.NDArray[np.int64]


class DeadEntries:
    """Dead flags for the entries of groups keyed by the prompt (``own_keys`` False), one
    life cycle per layer group; nothing is ever dead with fewer than two groups."""

    def __init__(self, life_cycles: Sequence[LifeCycle], tokens_per_block: int) -> None:
        self.lcs, self.tpb = tuple(life_cycles), tokens_per_block
        self.prompt_keyed = [g for g, lc in enumerate(self.lcs) if not lc.own_keys] if len(self.lcs) > 1 else []
        self.unsettled: set[bytes] = set()  # keys whose entries' flags may be out of date

    def changed(self, keys: Iterable[bytes]) -> None:
        """Entries under these keys were inserted or removed."""
        if self.prompt_keyed:
            self.unsettled.update(keys)

    def settle(self, t: EntryTable) -> I64:
        """Recompute the flags under every changed key; the rows whose flag changed."""
        if not self.unsettled:
            return np.zeros(0, np.int64)
        keys, self.unsettled = self.unsettled, set()
        return np.array([r for k in keys for r in self._settle_key(t, k)], np.int64)

    def _settle_key(self, t: EntryTable, key: bytes) -> list[int]:
        rows = [t.by_group.get(LayerGroupId(g), {}).get(key) for g in self.prompt_keyed]
        present = [(g, r) for g, r in zip(self.prompt_keyed, rows, strict=True) if r is not None]
        if not present:
            return []
        o = int(t.ordinal[present[0][1]])
        missing = frozenset(self.lcs[g] for g, r in zip(self.prompt_keyed, rows, strict=True) if r is None)
        flipped = []
        for g, r in present:
            dead = int(is_dead(self.lcs[g], missing, o, self.tpb))
            if int(t.dead[r]) != dead:
                t.dead[r] = dead
                flipped.append(r)
        return flipped

    def expected(self, t: EntryTable, row: int) -> int:
        """The flag ``row`` should carry (for the invariant check)."""
        key, group = t.keys[row], int(t.group[row])
        if group not in self.prompt_keyed:
            return 0
        missing = frozenset(self.lcs[g] for g in self.prompt_keyed if key not in t.by_group.get(LayerGroupId(g), {}))
        return int(is_dead(self.lcs[group], missing, int(t.ordinal[row]), self.tpb))


@functools.lru_cache(maxsize=1 << 16)
def is_dead(lc: LifeCycle, missing: frozenset[LifeCycle], ordinal: int, tokens_per_block: int) -> bool:
    """Every match block ``ordinal`` of ``lc`` serves also needs a block of a missing kind
    (or no match needs it at all)."""
    lo, hi = lc.serves(ordinal, tokens_per_block)
    if hi is not None and hi < lo:
        return True
    for m in missing:
        m_lo, m_hi = m.serves(ordinal, tokens_per_block)
        if m_lo <= lo and (m_hi is None or (hi is not None and hi <= m_hi)) and (m_hi is None or m_lo <= m_hi):
            return True
    return False
