"""The ``hybridkv`` command: ``models``, ``plan`` (and more as layers land).

User mistakes print one clear line to stderr and exit with code 2; no tracebacks. Values
are bounded where they are validated (limits.py); ``main`` keeps a last net for the errors
Python raises on absurd sizes, worded as the hybridkv bug it would be.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from typing import Any

from hybridkv.cli.plan_args import add_plan_arguments, plan_spec_from_args
from hybridkv.core.errors import HybridKVError
from hybridkv.core.types import GIB, MIB
from hybridkv.layouts.catalog import ENTRIES
from hybridkv.planning.planner import (
    plan,
)
from hybridkv.planning.report import plan_json

EXIT_USAGE = 2
SAFETY_NET = "hybridkv should have refused this input earlier; please report the command line"
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def _print_error(message: str) -> None:
    """One line on stderr, whatever a user-given path or name inside ``message`` holds."""
    print(f"hybridkv: error: {message.translate(_LINE_BREAKS)}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own errors: one line, same exit code, no traceback
        _print_error(f"{message} (see `{self.prog} --help`)")
        raise SystemExit(EXIT_USAGE)


def _fmt_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.2f} MiB"


def cmd_models(args: argparse.Namespace) -> int:
    if args.json:
        rows = [{"name": e.name, "hf_repo": e.hf_repo, "description": e.description,
                 "max_position_embeddings": e.max_position_embeddings,
                 "kv_bytes_per_token": e.layout().kv_bytes_per_token(),
                 "unverified": list(e.unverified)} for e in ENTRIES]
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<26} {'max pos':>9}  layout")
    for e in ENTRIES:
        mark = " (*)" if e.unverified else ""
        print(f"{e.name:<26} {e.max_position_embeddings:>9}  {e.description}{mark}")
    print("(*) has values marked unverified; `hybridkv models --json` lists them")
    return 0


def _print_plan(j: dict[str, Any]) -> None:
    print(f"model {j['model']}: KV quota {_fmt_bytes(j['gpu_bytes'])} "
          f"(used {_fmt_bytes(j['gpu_bytes_used'])}), tokens_per_block {j['tokens_per_block']}, "
          f"max_batch_size {j['max_batch_size']}, max_seq_len {j['max_seq_len']}")
    print(f"{'pool':>4} {'life cycles':<28} {'layers':>6} {'slot':>10} {'slots':>9} "
          f"{'floor':>8} {'bytes':>11}  floor set by")
    for g in j["pool_groups"]:
        names = [lg["life_cycle"] for lg in g["layer_groups"]]
        lcs = "+".join(n if names.count(n) == 1 else f"{names.count(n)}x{n}" for n in dict.fromkeys(names))
        print(f"{g['id']:>4} {lcs:<28} {len(g['layer_ids']):>6} {g['slot_bytes']:>10} "
              f"{g['slots']:>9} {g['min_slots']:>8} {_fmt_bytes(g['bytes']):>11}  "
              f"{g['floor_source']}")
    print(f"max concurrency at {j['max_seq_len']} tokens: "
          f"{j['max_concurrency_at_max_seq_len']:.2f} requests "
          f"(ideal {j['ideal_concurrency_at_max_seq_len']:.2f}, "
          f"ratio {j['concurrency_ratio_to_ideal']:.3f}; binding pool group "
          f"{j['binding_pool_group']})")
    longest, ideal = j["max_seq_len_at_max_batch_size"], j["ideal_max_seq_len_at_max_batch_size"]
    print(f"longest sequence for {j['max_batch_size']} concurrent requests: "
          f"{'unbounded' if longest is None else longest} tokens"
          + ("" if ideal is None or longest is None else f" (ideal {ideal}, ratio {longest / ideal:.3f})"))
    if j["pools_mode"] == "shared":
        print(f"shared arena: page {j['page_bytes']} B, {j['tables_per_step']} layer groups (tables per step) "
              f"in {j['families']} families (one [rows, blocks, groups] array each), "
              f"padding {j['padding_bytes']} B per block of every group")
    for note in j["own_pools"]:
        print(f"note: {note}")
    for note in j["unverified"]:
        print(f"note (unverified catalog value): {note}")


def cmd_plan(args: argparse.Namespace) -> int:
    j = plan_json(plan(plan_spec_from_args(args)))
    if args.json:
        print(json.dumps(j, indent=2))
    else:
        _print_plan(j)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hybridkv", description="KV-cache planning and management for hybrid models")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    m = sub.add_parser("models", help="list the built-in model catalog")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)
    pl = sub.add_parser("plan", help="plan pool sizes for a model and a memory quota")
    add_plan_arguments(pl, "host bytes for the offload tier, e.g. 64GiB", constraints=True)
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)
    from hybridkv.cli.bench import add_bench_parser  # `bench` lives with the benchmark; imported only here

    add_bench_parser(sub)
    from hybridkv.cli.simulate import add_simulate_parser  # `simulate` lives with the simulator

    add_simulate_parser(sub)
    from hybridkv.cli.generate import add_generate_parser  # the engine commands; torch is imported on use
    from hybridkv.cli.serve_bench import add_serve_bench_parser

    add_generate_parser(sub)
    add_serve_bench_parser(sub)
    return p


def _escape_unencodable_output() -> None:
    """A file name that is not valid UTF-8 (surrogate escapes in argv) can become a model
    name: print it escaped rather than fail mid-table with UnicodeEncodeError."""
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _escape_unencodable_output()
    try:
        code: int = args.func(args)
        return code
    except HybridKVError as e:
        _print_error(str(e))
        return EXIT_USAGE
    except BrokenPipeError:  # `hybridkv models | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except (MemoryError, RecursionError, OverflowError, OSError) as e:  # the last net, not the plan
        _print_error(f"{type(e).__name__}: {e} ({SAFETY_NET})")
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
