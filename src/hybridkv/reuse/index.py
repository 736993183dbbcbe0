"""PrefixIndex: which block keys are cached where, per layer group, and the longest prefix a
new request can take from the cache when every layer group must be able to serve it.

The index is storage-agnostic: it records slot ids and tiers the caller hands it and never
allocates or frees a slot. Ownership rule for the caller: while an entry exists, the index
holds its slot; ``refcount`` counts live requests that also use it. A slot returns to its
allocator only through ``remove`` / ``clear`` (which hand the removed entries back) or the
duplicates an ``insert`` reports.

Children of removed parents are allowed, and must be: a sliding-window group caches only the
sink blocks and the blocks still live, and its old window blocks are evicted while later ones
stay. An entry's key still names its whole prefix, so it remains correct; ``probe`` only uses
it where its group's life cycle needs nothing older. What ``check_invariants`` does enforce:
a key has one (parent, ordinal) in every group; a block-0 entry's parent is a scope root seen
at insert; a parent that is present anywhere sits at ordinal - 1; refcounts >= 0; one entry
per (layer group, tier, slot).

Dead entries (an index built with the groups' life cycles, ``reuse.dead``): entries no match
can use now are flagged and evicted first. Flags change in ``insert`` / ``remove`` and are
settled by ``settle`` (which ``evictable`` calls), returning the rows whose eviction keys
changed.

Layer group ids are positions in the ``layer_groups`` list given to ``probe`` (the manager's
``grouped.layer_groups`` order). An SSM group stores state snapshots: the snapshot taken at
history ``L`` is the entry (key of block ``L / tpb - 1``, ordinal ``L / tpb - 1``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import InvariantError, UsageError
from hybridkv.core.types import LayerGroupId, TierId
from hybridkv.lifecycles import LifeCycle
from hybridkv.reuse.dead import DeadEntries
from hybridkv.reuse.entries import CachedEntry, EntryRef, EntryTable
from hybridkv.reuse.events import AllCleared, BlockRemoved, BlockStored, BlockUpdated, EventQueue
from hybridkv.reuse.eviction import PriorityLRU, make_policy
from hybridkv.reuse.match import Present, longest_match, needed_blocks

I64 = npt.NDArray[np.int64]
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True, eq=False)
class InsertResult:
    """Per offered entry: ``new_mask`` True when the index took the caller's slot; False when
    (key, group) was already cached, so the caller's slot is a duplicate it should free (or
    keep privately) and ``cached_slots`` names the slot the index already holds."""

    new_mask: npt.NDArray[np.bool_]
    cached_slots: I64
    rows: I64  # the index row of each offered entry (new or already cached)

    @property
    def num_new(self) -> int:
        return int(self.new_mask.sum())


@dataclass(frozen=True, slots=True, eq=False)
class MatchedBlocks:
    """One layer group's share of a match: the cached blocks it needs (ascending ordinals),
    their slots and tier ids (not all on the GPU)."""

    ordinals: I64
    slots: I64
    tiers: I64
    rows: I64  # the index rows of these entries


@dataclass(frozen=True, slots=True, eq=False)
class Match:
    """The longest servable prefix: ``tokens`` (a multiple of tpb, possibly 0) and, per layer
    group, the blocks a request resuming there needs. Valid until the index next changes."""

    tokens: int
    per_group: tuple[MatchedBlocks, ...]


class Locations(NamedTuple):
    """Where a tier's entries sit: parallel arrays of layer group ids and slot ids."""

    layer_groups: I64
    slots: I64


class PrefixIndex:
    """Cached entries per (key, layer group) with reference counts, eviction order and events."""

    def __init__(self, events: EventQueue | None = None, eviction: str = PriorityLRU.name,
                 windowed_groups: Iterable[int] = (), life_cycles: Sequence[LifeCycle] = (),
                 tokens_per_block: int = 1) -> None:
        """``windowed_groups``: layer groups (window / chunked attention) whose newest blocks are
        the useful ones, so eviction takes their shallowest first. ``life_cycles`` (one per
        layer group) turns on dead-entry marking (module docstring)."""
        if tokens_per_block < 1:
            raise UsageError(f"PrefixIndex: tokens_per_block must be >= 1, got {tokens_per_block}")
        self.events = events
        self.policy = make_policy(eviction)
        self._windowed = np.array(sorted(int(g) for g in windowed_groups), np.int64)
        self._t = EntryTable()
        self._roots: set[bytes] = set()
        self._clock = 0
        self._dead = DeadEntries(life_cycles, tokens_per_block)

    def __len__(self) -> int:
        return len(self._t)

    # ---- lookups ---------------------------------------------------------------------------

    def entry(self, key: bytes, layer_group: int) -> CachedEntry | None:
        """A snapshot of one entry, or None when it is not cached."""
        row = self._t.by_group.get(LayerGroupId(layer_group), {}).get(key)
        return None if row is None else self._t.snapshot(row)

    def _ordinals(self, keys: Sequence[bytes], ordinals: npt.ArrayLike, op: str) -> I64:
        ords = np.asarray(ordinals, dtype=np.int64)
        if ords.ndim != 1 or (ords.size and (ords[0] < 0 or ords[-1] >= len(keys) or (np.diff(ords) <= 0).any())):
            raise UsageError(f"{op}: ordinals must be strictly increasing within [0, {len(keys)}) "
                             f"(one per key of the request's chain), got {ords.tolist()}")
        return ords

    def _rows(self, keys: Sequence[bytes], ords: I64, layer_group: int, op: str) -> I64:
        d = self._t.by_group.get(LayerGroupId(layer_group), {})
        rows = np.empty(ords.size, np.int64)
        for i, o in enumerate(ords.tolist()):
            r = d.get(keys[o])
            if r is None or self._t.ordinal[r] != o:
                raise UsageError(f"{op}: block {o} of layer group {layer_group} is not cached under that key")
            rows[i] = r
        return rows

    def _ref_rows(self, refs: Iterable[EntryRef], op: str) -> I64:
        rows: list[int] = []
        for ref in refs:
            r = self._t.by_group.get(ref.layer_group, {}).get(ref.key)
            if r is None:
                raise UsageError(f"{op}: no entry {ref.key.hex()[:16]}… in layer group {ref.layer_group}")
            rows.append(r)
        if len(set(rows)) != len(rows):
            raise UsageError(f"{op}: an entry is named twice")
        return np.array(rows, np.int64)

    # ---- insert / refcounts ----------------------------------------------------------------

    def insert(self, keys: Sequence[bytes], ordinals: npt.ArrayLike, layer_group: int, slots: npt.ArrayLike,
               tier: TierId, priority: int = 0, *, root: bytes,
               block_tokens: npt.ArrayLike | None = None) -> InsertResult:
        """Record that blocks ``ordinals`` of the chain ``keys`` (the request's keys, one per
        full block; ``root`` = its scope root, the parent of block 0) are cached for
        ``layer_group`` in ``slots`` on ``tier``. Idempotent per (key, group): existing entries
        are left as they are (see ``InsertResult``). New entries start with refcount 0; a
        request still using them calls ``acquire``. ``block_tokens`` (one row of token ids per
        ordinal) is required when events are on: routers get them in ``BlockStored``."""
        ords = self._ordinals(keys, ordinals, "insert")
        slot_arr = np.asarray(slots, dtype=np.int64)
        if slot_arr.shape != ords.shape or (slot_arr < 0).any():
            raise UsageError(f"insert: need one slot id >= 0 per ordinal, got {slot_arr.tolist()} "
                             f"for ordinals {ords.tolist()}")
        tokens = None if block_tokens is None else np.asarray(block_tokens, dtype=np.int64)
        if self.events is not None and (tokens is None or tokens.ndim != 2 or tokens.shape[0] != ords.size):
            raise UsageError("insert: with an event queue, block_tokens must be one row of token ids per ordinal")
        d = self._t.by_group.get(LayerGroupId(layer_group), {})
        found = [d.get(keys[o]) for o in ords.tolist()]
        new_mask = np.fromiter((r is None for r in found), np.bool_, ords.size)
        cached = slot_arr.copy()
        rows = np.fromiter((-1 if r is None else r for r in found), np.int64, ords.size)
        if not new_mask.all():
            old = np.flatnonzero(~new_mask)
            old_rows = np.array([found[i] for i in old.tolist()], np.int64)
            bad = np.flatnonzero(self._t.ordinal[old_rows] != ords[old])
            if bad.size:
                o, r = int(ords[old[bad[0]]]), int(old_rows[bad[0]])
                raise UsageError(f"insert: key of block {o} is already cached as block {int(self._t.ordinal[r])}")
            cached[old] = self._t.slot[old_rows]
        new_ords = ords[new_mask]
        new_keys = [keys[o] for o in new_ords.tolist()]
        if len(set(new_keys)) != len(new_keys):
            raise UsageError("insert: the chain repeats a key (keys must come from block_keys)")
        parents = [keys[o - 1] if o else root for o in new_ords.tolist()]
        self._clock += 1
        self._roots.add(root)
        rows[new_mask] = self._t.add(new_keys, parents, new_ords, LayerGroupId(layer_group), slot_arr[new_mask],
                                     TierId(tier), priority, self._clock)
        self._dead.changed(new_keys)
        if self.events is not None and tokens is not None and new_ords.size:
            self._emit_stored(new_keys, parents, new_ords, tokens[new_mask], TierId(tier), LayerGroupId(layer_group))
        return InsertResult(new_mask, cached, rows)

    def _emit_stored(self, keys: list[bytes], parents: list[bytes], ords: I64, tokens: I64, tier: TierId,
                     group: LayerGroupId) -> None:
        assert self.events is not None
        cuts = np.flatnonzero(np.diff(ords) != 1) + 1  # one event per run of consecutive ordinals
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), ords.size], strict=True):
            self.events.put(BlockStored(parents[lo], tuple(keys[lo:hi]),
                                        tuple(tuple(row) for row in tokens[lo:hi].tolist()), tier, group))

    def acquire(self, keys: Sequence[bytes], ordinals: npt.ArrayLike, layer_group: int) -> None:
        """A request starts using these entries: refcount + 1 (pins them against ``remove``)."""
        rows = self._rows(keys, self._ordinals(keys, ordinals, "acquire"), layer_group, "acquire")
        self._clock += 1
        self._t.refcount[rows] += 1
        self._t.last_used[rows] = self._clock

    def release(self, keys: Sequence[bytes], ordinals: npt.ArrayLike, layer_group: int) -> None:
        """A request stops using these entries: refcount - 1; at 0 they become evictable."""
        rows = self._rows(keys, self._ordinals(keys, ordinals, "release"), layer_group, "release")
        if (self._t.refcount[rows] < 1).any():
            raise UsageError(f"release: an entry of layer group {layer_group} is not acquired (refcount 0)")
        self._clock += 1
        self._t.refcount[rows] -= 1
        self._t.last_used[rows] = self._clock

    def acquire_match(self, match: Match) -> None:
        """``acquire`` every group's blocks of ``match`` at once (all or nothing); the match
        must come from a probe since which the index has not changed."""
        self._bump_match(match, +1)

    def release_match(self, match: Match) -> None:
        """``release`` every group's blocks of ``match`` at once (all or nothing)."""
        self._bump_match(match, -1)

    def _bump_match(self, match: Match, delta: int) -> None:
        op = "acquire_match" if delta > 0 else "release_match"
        rows = np.concatenate([np.zeros(0, np.int64), *(mb.rows for mb in match.per_group)])
        self._check_rows(rows, op)
        if delta < 0 and (self._t.refcount[rows] < 1).any():
            raise UsageError(f"{op}: an entry of the match is not acquired (refcount 0)")
        self._clock += 1
        self._t.refcount[rows] += delta
        self._t.last_used[rows] = self._clock

    def touch(self, keys: Iterable[bytes], layer_group: int | None = None) -> I64:
        """Mark the cached entries of these keys (in one or every group) as just used;
        keys not cached are skipped. Returns the rows touched (their eviction keys changed)."""
        groups = self._t.by_group if layer_group is None else {
            LayerGroupId(layer_group): self._t.by_group.get(LayerGroupId(layer_group), {})}
        self._clock += 1
        keys = list(keys)
        rows = np.fromiter((r for d in groups.values() for k in keys if (r := d.get(k)) is not None), np.int64)
        self._t.last_used[rows] = self._clock
        return rows

    # ---- rows: stable names of live entries, for callers that keep their own order ---------

    def eviction_keys(self, rows: I64) -> list[int]:
        """The eviction policy's sort key of each live row as one comparable int whose low bits
        are the row (``reuse.eviction.ROW_MASK``): a caller that keeps candidates in a heap
        pushes these; an item is current while ``eviction_keys([row])`` still equals it (an
        insert, touch or acquire changes it)."""
        return self.policy.keys(self._t, rows, self._windowed)

    def live_mask(self, rows: I64) -> npt.NDArray[np.bool_]:
        """Which of these rows (any row ever handed out) hold a live entry now."""
        out: npt.NDArray[np.bool_] = self._t.live[rows]
        return out

    def row_locations(self, rows: I64) -> tuple[I64, I64, I64]:
        """(layer groups, tiers, slots) of live rows, as arrays."""
        t = self._t
        return t.group[rows].copy(), t.tier[rows].copy(), t.slot[rows].copy()

    def ref_at(self, row: int) -> EntryRef:
        """The name of a live row's entry."""
        return EntryRef(self._t.keys[row], LayerGroupId(int(self._t.group[row])))

    def rows_of(self, keys: Iterable[bytes], layer_group: int) -> I64:
        """Rows of the cached entries among ``keys`` in one layer group (absent keys skipped)."""
        d = self._t.by_group.get(LayerGroupId(layer_group), {})
        return np.fromiter((r for k in keys if (r := d.get(k)) is not None), np.int64)

    # ---- probe -----------------------------------------------------------------------------

    def probe(self, keys: Sequence[bytes], layer_groups: Sequence[LifeCycle], tokens_per_block: int,
              max_tier: TierId | None = None, group_keys: Sequence[Sequence[bytes]] | None = None) -> Match:
        """The longest prefix (tokens) of the prompt with block ``keys`` every layer group can
        serve from entries on tiers <= ``max_tier`` (None: any tier), and the blocks each group needs there.
        ``group_keys[g]``: the keys group ``g``'s pages go under when not the prompt's
        (``LifeCycle.reuse_keys``). Changes nothing."""
        if tokens_per_block < 1 or not layer_groups:
            raise UsageError(f"probe needs tokens_per_block >= 1 and >= 1 layer group, got "
                             f"{tokens_per_block} and {len(layer_groups)}")
        per_keys = [keys] * len(layer_groups) if group_keys is None else group_keys
        groups = [self._t.by_group.get(LayerGroupId(g), {}) for g in range(len(layer_groups))]
        present = [self._presence(k, d, max_tier) for k, d in zip(per_keys, groups, strict=True)]
        blocks = longest_match(layer_groups, present, len(keys), tokens_per_block)
        per_group = []
        for lc, d, gk in zip(layer_groups, groups, per_keys, strict=True):
            ords = needed_blocks(lc, blocks, tokens_per_block)
            rows = np.array([d[gk[o]] for o in ords.tolist()], np.int64)
            per_group.append(MatchedBlocks(ords, self._t.slot[rows], self._t.tier[rows], rows))
        return Match(blocks * tokens_per_block, tuple(per_group))

    def _presence(self, keys: Sequence[bytes], d: dict[bytes, int], max_tier: TierId | None) -> Present:
        if max_tier is None:
            return lambda j: keys[j] in d
        tier, limit = self._t.tier, int(max_tier)
        return lambda j: (r := d.get(keys[j])) is not None and int(tier[r]) <= limit

    # ---- dead entries ----------------------------------------------------------------------

    def settle(self) -> I64:
        """Bring the dead flags of the entries under keys inserted or removed since the last
        call up to date; returns the rows whose flag changed (their eviction keys changed:
        a caller keeping a heap re-pushes them)."""
        return self._dead.settle(self._t)

    # ---- eviction, offload, clear ----------------------------------------------------------

    def evictable(self, tier: TierId, layer_group: int | None = None, limit: int | None = None) -> list[CachedEntry]:
        """Entries on ``tier`` nobody uses (refcount 0), in the policy's eviction order
        (``priority-lru``: lowest priority, least recently used, deepest block first; see
        ``reuse.eviction``). At most ``limit`` of them (much cheaper than all)."""
        if limit is not None and limit < 0:
            raise UsageError(f"evictable: limit must be >= 0 or None, got {limit}")
        self.settle()
        t = self._t
        mask = t.live & (t.refcount == 0) & (t.tier == int(tier))
        if layer_group is not None:
            mask &= t.group == layer_group
        rows = np.flatnonzero(mask)
        return t.snapshots(rows[self.policy.order(t, rows, limit, self._windowed)])

    def remove(self, refs: Iterable[EntryRef]) -> list[CachedEntry]:
        """Forget these entries (all refcount 0, else UsageError and nothing changes) and hand
        them back: their slots are the caller's to free."""
        rows = self._ref_rows(refs, "remove")
        gone = self._t.snapshots(rows)
        self.remove_rows(rows)
        return gone

    def remove_rows(self, rows: I64) -> None:
        """``remove`` by row (distinct live rows, as ``eviction_keys`` names them): no key
        lookups, no snapshots unless events are on."""
        self._check_rows(rows, "remove")
        if (self._t.refcount[rows] > 0).any():
            raise UsageError("remove: an entry is still used by a request (refcount > 0); release it first")
        gone = self._t.snapshots(rows) if self.events is not None else []
        self._dead.changed(self._t.keys[r] for r in rows.tolist())
        self._t.drop(rows)
        if self.events is not None:
            for (g, tier), ks in _grouped(gone, lambda e: (e.layer_group, e.tier)).items():
                self.events.put(BlockRemoved(tuple(ks), tier, g))

    def _check_rows(self, rows: I64, op: str) -> None:
        if rows.size and (not self._t.live[rows].all() or np.unique(rows).size != rows.size):
            raise UsageError(f"{op}: rows must be distinct live entries")

    def move(self, refs: Iterable[EntryRef], new_tier: TierId, new_slots: npt.ArrayLike) -> list[CachedEntry]:
        """Entries now live in ``new_slots`` on ``new_tier`` (offload / onload after the caller
        copied the pages). Returns the old locations, whose slots the caller frees. Moving an
        entry a request uses is allowed; that request must switch to the new slot itself."""
        rows = self._ref_rows(refs, "move")
        old = self._t.snapshots(rows)
        self.move_rows(rows, new_tier, new_slots)
        return old

    def move_rows(self, rows: I64, new_tier: TierId, new_slots: npt.ArrayLike) -> None:
        """``move`` by row (distinct live rows): no key lookups, no snapshots unless events are on."""
        self._check_rows(rows, "move")
        slots = np.asarray(new_slots, dtype=np.int64)
        if slots.shape != rows.shape or (slots < 0).any():
            raise UsageError(f"move: need one slot id >= 0 per entry ({rows.size}), got {slots.tolist()}")
        old = self._t.snapshots(rows) if self.events is not None else []
        self._t.tier[rows], self._t.slot[rows] = int(new_tier), slots
        if self.events is not None:
            for (g, prio), ks in _grouped(old, lambda e: (e.layer_group, e.priority)).items():
                self.events.put(BlockUpdated(tuple(ks), TierId(new_tier), prio, g))

    def clear(self) -> list[CachedEntry]:
        """Forget everything (nothing may be in use) and hand every entry back."""
        rows = self._t.live_rows()
        if (self._t.refcount[rows] > 0).any():
            raise UsageError("clear: entries are still used by requests (refcount > 0)")
        gone = self._t.snapshots(rows)
        self._t, self._roots = EntryTable(), set()
        self._dead.unsettled = set()
        if self.events is not None:
            self.events.put(AllCleared())
        return gone

    def located(self, tier: TierId) -> Locations:
        """Layer groups and slots of every entry on ``tier``, as arrays (no snapshots): what
        the cache holds there, e.g. to count slots per pool group."""
        t = self._t
        rows = np.flatnonzero(t.live & (t.tier == int(tier)))
        return Locations(t.group[rows].copy(), t.slot[rows].copy())

    def entries(self) -> list[CachedEntry]:
        """Every cached entry (snapshots), in row order."""
        return self._t.snapshots(self._t.live_rows())

    # ---- invariants ------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise InvariantError when the index is inconsistent (see the module docstring)."""
        t, live = self._t, self._t.live_rows()
        _check(len(t) == live.size and len(t.free) + live.size == t.live.size, "row accounting")
        for g, d in t.by_group.items():
            for k, r in d.items():
                _check(bool(t.live[r]) and t.keys[r] == k and t.group[r] == g, f"row {r} of group {g}")
        _check(bool((t.refcount[live] >= 0).all()), "negative refcount")
        _check(bool((t.last_used[live] <= self._clock).all()), "last_used ahead of the clock")
        _check(bool((t.tier[live] >= 0).all()), "negative tier id")
        places = set(zip(t.group[live].tolist(), t.tier[live].tolist(), t.slot[live].tolist(), strict=True))
        _check(len(places) == live.size, "two entries share a (layer group, tier, slot)")
        chain: dict[bytes, tuple[bytes, int]] = {}
        for r in live.tolist():
            link = (t.parents[r], int(t.ordinal[r]))
            _check(chain.setdefault(t.keys[r], link) == link, f"key at row {r} has two (parent, ordinal)")
            _check(link[1] > 0 or link[0] in self._roots, f"block-0 entry at row {r} has an unknown root")
        for parent, ordinal in chain.values():
            up = chain.get(parent)
            _check(up is None or up[1] == ordinal - 1, f"parent of a block {ordinal} entry is not block {ordinal - 1}")
        if not self._dead.unsettled:
            for r in live.tolist():
                _check(int(t.dead[r]) == self._dead.expected(t, r), f"dead flag of row {r}")


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise InvariantError(f"PrefixIndex invariant broken: {what}")


def _grouped(entries: list[CachedEntry], by: Callable[[CachedEntry], K]) -> dict[K, list[bytes]]:
    """Keys of ``entries`` bucketed by ``by(entry)``, in first-seen order (one event per bucket)."""
    out: dict[K, list[bytes]] = {}
    for e in entries:
        out.setdefault(by(e), []).append(e.key)
    return out
