"""``--plot``: GPU occupancy of every pool group over simulated time (matplotlib, imported
lazily; it is the optional extra ``hybridkv[plot]``)."""

from __future__ import annotations

import importlib.util
from typing import Any

from hybridkv.core.errors import ConfigError
from hybridkv.sim.result import SimResult

INSTALL_HINT = "--plot needs matplotlib: pip install matplotlib (or pip install 'hybridkv[plot]')"


def require_matplotlib() -> None:
    """ConfigError naming the install command when matplotlib is missing (checked before a
    long run, not after it)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(INSTALL_HINT)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return plt


def plot_occupancy(result: SimResult, path: str) -> None:
    """Write a PNG: utilization per pool group (left axis) and running requests (right axis)."""
    plt = _pyplot()
    occ = result.occupancy
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)
    marker = "o" if len(occ.time_s) < 50 else None  # a short run (a deadlock at step 2) stays visible
    for g, series in enumerate(occ.utilization):
        ax.plot(occ.time_s, [100 * u for u in series], lw=1.2, marker=marker,
                label=f"pool group {g} ({result.slots_per_pool_group[g]} slots)")
    if result.deadlocked:
        ax.axvline(result.sim_seconds, color="red", lw=1, ls=":", label="deadlock: the run ends")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("GPU slots in use (%)")
    ax.set_ylim(0, 105)
    ax.set_xlim(left=0)
    right = ax.twinx()
    right.plot(occ.time_s, occ.running, color="0.6", lw=0.8, ls="--", marker=marker, label="running requests")
    right.set_ylabel("running requests")
    right.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
    status = "DEADLOCKED" if result.deadlocked else f"{result.completed}/{result.requests} completed"
    ax.set_title(f"{result.model} · {result.workload} · planner {result.planner} · {result.policy} — {status}",
                 fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise ConfigError(f"--plot {path}: cannot write the file ({e.strerror})") from None
    finally:
        plt.close(fig)
