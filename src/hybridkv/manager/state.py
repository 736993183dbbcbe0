"""Request cache states and the one table of allowed transitions.

    create ──> SUSPENDED ──resume──> ACTIVE ──suspend──> SUSPENDED
                   │                   │
                   └──────close────────┴──close──> CLOSED

A new cache is SUSPENDED with no pages (``open()`` = ``create()`` + ``resume()``). Only
ACTIVE caches take ``resize`` / ``step`` / ``commit``; a SUSPENDED cache's pages may be moved
to a lower tier whenever the GPU needs room.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from hybridkv.core.errors import UsageError


class RequestState(enum.IntEnum):
    SUSPENDED = 0
    ACTIVE = 1
    CLOSED = 2


ALLOWED: dict[str, frozenset[RequestState]] = {
    "resume": frozenset({RequestState.SUSPENDED}),
    "suspend": frozenset({RequestState.ACTIVE}),
    "close": frozenset({RequestState.SUSPENDED, RequestState.ACTIVE}),
    "resize": frozenset({RequestState.ACTIVE}),
    "commit": frozenset({RequestState.ACTIVE, RequestState.SUSPENDED}),
}


def check_transition(op: str, handle: int, state: RequestState) -> None:
    """UsageError unless ``op`` is allowed from ``state``."""
    if state not in ALLOWED[op]:
        allowed = ", ".join(s.name.lower() for s in sorted(ALLOWED[op]))
        raise UsageError(f"cannot {op} request {handle}: it is {state.name.lower()} "
                         f"({op} needs {allowed})")


@dataclass(frozen=True, slots=True)
class CacheLengths:
    """A cache's three lengths (tokens)."""

    capacity: int
    history: int
    committed: int
