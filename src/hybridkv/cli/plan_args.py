"""The plan's command-line options, shared by ``hybridkv plan`` and ``hybridkv simulate``: one
definition of each flag and one way to turn them into a ``PlanSpec``."""

from __future__ import annotations

import argparse

from hybridkv.cli.specs import parse_batch, parse_size, parse_tokens
from hybridkv.layouts.grouping import POOL_MODES
from hybridkv.layouts.models import load_model
from hybridkv.planning.planner import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_POOLS,
    DEFAULT_TOKENS_PER_BLOCK,
    PlanSpec,
    default_max_seq_len,
)


def add_plan_arguments(p: argparse.ArgumentParser, host_help: str, constraints: bool) -> None:
    """MODEL, --gpu-mem, --host-mem, --max-batch-size, --max-seq-len, --tokens-per-block,
    --typical, and --constraint where the command takes constraints."""
    p.add_argument("model", help="catalog name, hybridkv layout JSON, or HF config.json path")
    p.add_argument("--gpu-mem", required=True, help="GPU bytes for KV cache, e.g. 40GiB")
    p.add_argument("--host-mem", help=host_help)
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE)
    p.add_argument("--max-seq-len", help="tokens (default: model max, capped at 32k)")
    p.add_argument("--tokens-per-block", type=int, default=DEFAULT_TOKENS_PER_BLOCK)
    p.add_argument("--pools", choices=POOL_MODES, default=DEFAULT_POOLS,
                   help="shared: one arena of equal pages every layer group draws from (default); "
                        "per-lifecycle: a pool per life cycle with static floors")
    if constraints:
        p.add_argument("--constraint", action="append", default=[],
                       help="batch that must fit at once: COUNTxCAP[@HIST][+...][,prefix=N]")
    p.add_argument("--typical", help="typical step that sets the pool split: COUNTxCAP[@HIST][+...] "
                                     "(e.g. 16x4k: the workload's real lengths)")


def plan_spec_from_args(args: argparse.Namespace) -> PlanSpec:
    """The PlanSpec the plan options describe (ConfigError naming the option otherwise)."""
    layout = load_model(args.model)
    max_seq_len = (parse_tokens(args.max_seq_len, "--max-seq-len") if args.max_seq_len
                   else default_max_seq_len(layout))
    constraints = tuple(parse_batch(c, f"constraint{i}") for i, c in enumerate(getattr(args, "constraint", [])))
    return PlanSpec(
        layout=layout, gpu_bytes=parse_size(args.gpu_mem, "--gpu-mem"), max_seq_len=max_seq_len,
        tokens_per_block=args.tokens_per_block, max_batch_size=args.max_batch_size,
        host_bytes=parse_size(args.host_mem, "--host-mem", allow_zero=True) if args.host_mem else 0,
        constraints=constraints,
        typical_step=parse_batch(args.typical, "typical", "--typical") if args.typical else None,
        pools=args.pools,
    )
