"""Compare this checkout with an earlier commit, in one run on one machine:

1. ``hybridkv plan`` (text and ``--json``) for every catalog model at two lengths and
   ``hybridkv simulate --json`` on three workloads must print the same bytes (timing
   fields of ``simulate`` aside);
2. ``hybridkv bench step --json`` at the given batch sizes, both checkouts interleaved
   ``--rounds`` times: median step cost and the ratio new / base.

    python benchmarks/compare_to_commit.py 038a34d --batch 1024 --rounds 5

The base commit is checked out into a temporary git worktree and run with ``PYTHONPATH``;
its console module is found whether it is ``hybridkv.cli`` (a module) or ``hybridkv.cli.main``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMING = {"wall_seconds", "steps_per_wall_second", "bookkeeping_us_per_step_p50"}
SIMULATIONS = [
    ["simulate", "gemma-3-27b", "--gpu-mem", "40GiB", "--workload", "chat", "--requests", "200", "--json"],
    ["simulate", "gpt-oss-20b", "--gpu-mem", "24GiB", "--workload", "multi-turn", "--requests", "120",
     "--prefix-cache", "--host-mem", "8GiB", "--json"],
    ["simulate", "issue-15401", "--gpu-mem", "3936092160", "--workload", "issue-15401", "--max-batch-size", "64",
     "--tokens-per-block", "256", "--max-seq-len", "137984", "--json"],
]


def run(tree: Path, argv: list[str]) -> str:
    module = "hybridkv.cli.main" if (tree / "src/hybridkv/cli/main.py").exists() else "hybridkv.cli"
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=tree, env=env, capture_output=True,
                          text=True, check=False, timeout=900)
    return f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"


def models(tree: Path) -> list[str]:
    out = run(tree, ["models"]).splitlines()[2:]
    return [line.split()[0] for line in out if line and not line.startswith(("(", " "))]


def same_outputs(base: Path, new: Path) -> tuple[int, list[str]]:
    """(commands compared, the ones whose output differs)."""
    diffs, compared = [], 0
    for name in models(new):
        for length in ("8k", "32k"):
            for extra in ([], ["--json"]):
                argv = ["plan", name, "--gpu-mem", "40GiB", "--max-seq-len", length, *extra]
                compared += 1
                if run(base, argv) != run(new, argv):
                    diffs.append(" ".join(argv))
    for argv in SIMULATIONS:
        compared += 1
        a, b = (json.loads(run(t, argv).split("\n", 1)[1]) for t in (base, new))
        if {k: v for k, v in a.items() if k not in TIMING} != {k: v for k, v in b.items() if k not in TIMING}:
            diffs.append(" ".join(argv))
    return compared, diffs


def step_cost(tree: Path, batch: int, layout: str) -> float:
    out = run(tree, ["bench", "step", "--batch", str(batch), "--layout", layout, "--repeats", "5", "--json"])
    return float(json.loads(out.split("\n", 1)[1])["us_per_step_median"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="the commit to compare with")
    ap.add_argument("--batch", type=int, nargs="+", default=[1024])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-outputs", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            if not args.skip_outputs:
                compared, diffs = same_outputs(base, ROOT)
                print(f"plan / simulate outputs: {compared} commands, "
                      + ("all identical" if not diffs else f"{len(diffs)} differ"))
                for d in diffs:
                    print("  differs:", d)
            print(f"{'layout':<12} {'batch':>6} {'base us':>9} {'new us':>9} {'new/base':>9}   (medians of "
                  f"{args.rounds} interleaved rounds)")
            for layout in ("vllm", "three-group"):
                for batch in args.batch:
                    times: dict[str, list[float]] = {"base": [], "new": []}
                    for _ in range(args.rounds):
                        times["base"].append(step_cost(base, batch, layout))
                        times["new"].append(step_cost(ROOT, batch, layout))
                    b, n = statistics.median(times["base"]), statistics.median(times["new"])
                    print(f"{layout:<12} {batch:>6} {b:>9.1f} {n:>9.1f} {n / b:>9.3f}")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False,
                           capture_output=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
