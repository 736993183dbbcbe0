"""Shared arena vs per-lifecycle pools over the whole catalog: how close each plan gets to the
ideal (every layer holding exactly its live tokens, no pages, no floors).

For every catalog model at 40 GiB, 16-token blocks, ``--max-seq-len`` 32k and 128k (where the
model's positions allow), ``--max-batch-size`` 32 and 256, both pool modes: max concurrency at
max_seq_len over its ideal, and the longest length ``max_batch_size`` requests reach together
over its ideal; "refused" when the planner's floors do not fit.

    python benchmarks/bench_arena.py
"""

from __future__ import annotations

import argparse

from hybridkv.core.errors import CapacityError
from hybridkv.layouts.catalog import BY_NAME as CATALOG
from hybridkv.layouts.grouping import POOL_MODES
from hybridkv.layouts.models import load_model
from hybridkv.planning.planner import PlanSpec, plan
from hybridkv.planning.report import (
    ideal_concurrency,
    ideal_max_seq_len_at,
    max_concurrency,
    max_seq_len_at,
)

GIB = 1 << 30


def cell(name: str, length: int, batch: int, pools: str) -> tuple[float, float] | None:
    """(concurrency / ideal, longest length at batch / its ideal); None when refused."""
    layout = load_model(name)
    try:
        p = plan(PlanSpec(layout, 40 * GIB, length, max_batch_size=batch, pools=pools))
    except CapacityError:
        return None
    conc = max_concurrency(p, length).requests / ideal_concurrency(layout, 40 * GIB, length)
    longest, ideal = max_seq_len_at(p, batch), ideal_max_seq_len_at(layout, 40 * GIB, batch)
    if longest is None or ideal is None:
        return conc, 1.0
    return conc, longest / ideal


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()  # no options: the grid is the issue's
    print("| model | max_seq_len | B | per-lifecycle conc / ideal | per-lifecycle length@B / ideal "
          "| shared conc / ideal | shared length@B / ideal |")
    print("|---|---|---|---|---|---|---|")
    met = total = 0
    for name in CATALOG:
        layout = load_model(name)
        for length in (32768, 131072):
            if length > (layout.max_position_embeddings or length):
                continue
            for batch in (32, 256):
                cells = [cell(name, length, batch, pools) for pools in POOL_MODES]
                text = [("refused", "refused") if c is None else (f"{c[0]:.3f}", f"{c[1]:.3f}") for c in cells]
                print(f"| {name} | {length // 1024}k | {batch} | {text[0][0]} | {text[0][1]} | "
                      f"{text[1][0]} | {text[1][1]} |")
                total += 1
                shared = cells[1]
                met += shared is not None and shared[0] >= 0.98 and shared[1] >= 0.98
    print(f"\nshared mode meets >= 0.98 on both ratios in {met} of {total} configurations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
