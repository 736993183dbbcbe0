"""Page-sized layer groups for one shared arena: which layers share a page.

In the shared-pool mode every layer group's block is one page of the same byte size, so all
of them draw from one allocator: a window block released now is a full-attention block next
step. A life cycle's layers are cut into layer groups whose slots fill a page of ``P`` bytes;
a group whose layers fill less is padded. The planner chooses ``P`` by a stated cost:

1. every life cycle that can join does: its layers packed into ``P``-byte pages waste < 5%
   of those pages (``JOIN_WASTE``); one that cannot keeps its own pool (and the report says
   why: a state of several MiB beside 32 KiB attention pages, say);
2. among the page sizes that let the most bytes join, the fewest tables per step (layer
   groups: each costs the manager and the kernels a table) whose padding is at most 1% of the
   arena's page bytes (``PADDING_BUDGET``);
3. then the least padding, then the smaller page.

Candidate sizes are ``k`` layers' pages of any per-token layer, ``k`` from 1 to the most
layers one life cycle has (at most ``MAX_LAYERS_PER_PAGE``), so a model with one per-layer
page size gets ``P = gcd``-friendly multiples: for gemma-3-27b (52 window + 10 full layers,
equal pages) that is 2 layers per page, 31 tables, no padding. Token layers are packed in
layout order (first fit, largest first within equal sizes keeps mixed sizes tight); a layer
larger than ``P`` rules that ``P`` out for its life cycle.

A state life cycle (SSM, gated delta net: one state per request, ``per_token`` False) is
*sliced* instead: its layers' states, back to back in layout order, are cut into
``ceil(S / P)`` page-sized slices, each a layer group of its own; a request's state is one
page in every slice group. So a 37.7 MiB state beside 384 KiB attention pages (qwen3-next:
12 full layers of 32 KiB per 16-token page) is 101 pages of the arena, 0.5% padding, instead
of a pool of its own with a static share. Slices of one life cycle form one family, so they
cost the step one table (``[rows, 1, slices]``); the cost counts them as layer groups all
the same, since the manager keeps a row of slots per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hybridkv.layouts.spec import ModelLayout
from hybridkv.lifecycles import LifeCycle

JOIN_WASTE = 0.05
"""A life cycle joins the arena only if padding wastes less than this share of its pages."""
MAX_LAYERS_PER_PAGE = 64
"""Most layers of one size a candidate page holds (bounds the search on very deep models)."""
MAX_SLICES = 4096
"""Most slices one state is cut into (each is a layer group with a row of slots per request)."""
PADDING_BUDGET = 0.01
"""Padding allowed across the arena's pages before fewer tables stop winning."""


@dataclass(frozen=True, slots=True)
class Packing:
    """One life cycle's layers cut into page-sized groups (layer ids per group, in order)."""

    life_cycle: LifeCycle
    groups: tuple[tuple[int, ...], ...]
    used_bytes: tuple[int, ...]  # per group: bytes its layers fill of the page
    sliced: bool = False  # groups are slices of one state over all the layers (see module doc)

    def padding(self, page_bytes: int) -> int:
        return sum(page_bytes - u for u in self.used_bytes)


@dataclass(frozen=True, slots=True)
class ArenaChoice:
    """The page size, the packed life cycles, and the life cycles left to their own pools
    with the reason."""

    page_bytes: int
    joined: tuple[Packing, ...]
    own_pools: tuple[tuple[LifeCycle, str], ...]

    @property
    def tables(self) -> int:
        return sum(len(p.groups) for p in self.joined)

    @property
    def padding_bytes(self) -> int:
        """Bytes of padding in one block of every arena layer group."""
        return sum(p.padding(self.page_bytes) for p in self.joined)


def _pack(size: Sequence[int], ids: Sequence[int], page: int) -> tuple[list[list[int]], list[int]] | None:
    """First-fit of the layers (``size[i]``: layer ``i``'s page bytes) into pages of ``page``
    bytes (None if one does not fit)."""
    sizes = {i: size[i] for i in ids}
    if max(sizes.values()) > page:
        return None
    if len(set(sizes.values())) == 1:  # equal layers: first fit fills runs of k in layout order
        k, one = page // size[ids[0]], size[ids[0]]
        runs = [list(ids[j:j + k]) for j in range(0, len(ids), k)]
        return runs, [len(r) * one for r in runs]
    groups: list[list[int]] = []
    used: list[int] = []
    smallest = min(sizes.values())
    open_groups: list[int] = []  # groups with room for the smallest layer, in creation order
    for i in sorted(ids, key=lambda i: -sizes[i]):  # stable: layout order within a size
        for g in open_groups:
            if used[g] + sizes[i] <= page:
                break
        else:
            g = len(groups)
            groups.append([])
            used.append(0)
            open_groups.append(g)
        groups[g].append(i)
        used[g] += sizes[i]
        if used[g] + smallest > page:
            open_groups.remove(g)
    return [sorted(g) for g in groups], used


def _slice(size: Sequence[int], ids: Sequence[int], page: int) -> tuple[list[list[int]], list[int]] | None:
    """A state life cycle's states back to back, cut into ``page``-byte slices (None: more
    than ``MAX_SLICES``)."""
    state = sum(size[i] for i in ids)
    n = -(-state // page)
    if n > MAX_SLICES:
        return None
    return [list(ids)] * n, [page] * (n - 1) + [state - (n - 1) * page]


def _candidate(size: Sequence[int], by_lc: dict[LifeCycle, list[int]], page: int) -> ArenaChoice:
    joined, own = [], []
    for lc, ids in by_lc.items():
        sliced = not lc.per_token  # a state is cut into slices; token layers are packed
        laid = _slice(size, ids, page) if sliced else _pack(size, ids, page)
        if laid is None:
            own.append((lc, f"its state would take more than {MAX_SLICES} slices of {page} B" if sliced
                        else f"a layer's page is larger than the {page} B arena page"))
            continue
        groups, used = laid
        waste = 1 - sum(used) / (len(groups) * page)
        if waste >= JOIN_WASTE:
            what = (f"its state in {page} B slices would waste {waste:.0%}" if sliced
                    else f"{page} B pages would waste {waste:.0%} of its memory")
            own.append((lc, f"{what} (>= {JOIN_WASTE:.0%})"))
            continue
        order = sorted(range(len(groups)), key=lambda g: groups[g][0])  # stable: slices keep their order
        joined.append(Packing(lc, tuple(tuple(groups[g]) for g in order), tuple(used[g] for g in order), sliced))
    return ArenaChoice(page, tuple(joined), tuple(own))


def choose_arena(layout: ModelLayout, tokens_per_block: int) -> ArenaChoice:
    """The page size and packing by the module's cost (see the docstring)."""
    by_lc: dict[LifeCycle, list[int]] = {}
    for i, layer in enumerate(layout.layers):
        by_lc.setdefault(layer.life_cycle, []).append(i)
    size = [layer.page_bytes(tokens_per_block) for layer in layout.layers]
    token_lcs = [ids for lc, ids in by_lc.items() if lc.per_token]
    sizes = sorted({size[i] for ids in token_lcs for i in ids})
    if not sizes:  # states only: one state life cycle's layers per page
        sizes = sorted({sum(size[i] for i in ids) for ids in by_lc.values()})
    most = min(max([len(ids) for ids in token_lcs] or [1]), MAX_LAYERS_PER_PAGE)
    pages = sorted({k * s for s in sizes for k in range(1, most + 1)})
    best: tuple[tuple[int, int, int, int, int], ArenaChoice] | None = None
    for page in pages:
        c = _candidate(size, by_lc, page)
        joined_bytes = sum(size[i] for p in c.joined for i in {i for g in p.groups for i in g})
        over_budget = c.padding_bytes > PADDING_BUDGET * c.tables * page
        key = (len(c.own_pools), -joined_bytes, int(over_budget), c.tables, c.padding_bytes)
        if best is None or key < best[0]:
            best = (key, c)
    assert best is not None  # a layout has >= 1 layer
    return best[1]
