"""Full attention: every token stays live; a request holds ``ceil(capacity / tpb)`` blocks.

The base contract's defaults are exactly full attention; what this kind adds is the match
search: a full group needs every block below the history it resumes at, so the first
missing block bounds the match (scanning up from block 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridkv.lifecycles.base import LifeCycle, MatchSearch, Present


class _UpSearch(MatchSearch):
    def __init__(self, present: Present) -> None:
        self.present = present

    def sink_bound(self, bound: int) -> int:
        return next((j for j in range(bound) if not self.present(j)), bound)


@dataclass(frozen=True, slots=True)
class Full(LifeCycle):
    """Full attention (also MLA latents and any cache that keeps every token)."""

    def describe(self) -> str:
        return "full"

    def match_search(self, present: Present, tokens_per_block: int, num_blocks: int) -> MatchSearch:
        return _UpSearch(present)
