"""Prefix cache at scale (issue 9): eviction, admission count and memory with 10^4..10^6 cached pages.

    python benchmarks/bench_prefix_scale.py [--entries 10000 100000 1000000] [--repeats R] [--steps S]
        [--rounds K] [--peer-python PATH] [--check] [--json]

Layout: one full-attention layer (8 KV heads x 128, bf16), tokens_per_block 16, bookkeeping
only (``StorageConfig(with_data=False)``), no host tier (an evicted page is dropped). A cache
of N entries (pages) is filled by opening requests with distinct 1,024-token prompts (64
blocks), stepping them to 1,024 tokens 512 at a time, publishing and closing them: their pages
are then held by the cache alone. Measured for each N:

(a) ``step 64``: GPU slots = N, so the free list is empty; ``manager.step`` takes one new
    request from 0 to 1,024 tokens and must take its 64 slots from the cache. Untimed, that
    request is then published under a fresh prompt and closed: the cache is back at N entries,
    the free list at 0, and every timed repeat evicts 64 pages. ``evict 64`` times
    ``PrefixCache.evict([64])`` alone the same way (an untimed request then takes the 64 free
    slots and is published). The first eviction after the build also turns every page the build
    left reclaimable into a heap item; it is reported apart (``first evict``, one call).
(b) ``reclaimable()``: median over 1,000 calls.
(c) ``schedule()`` + ``complete()`` per step, 64 decoding requests (prompts 1,024..1,039
    tokens, so four cross a block boundary every step): ``full`` = N cached pages and no free
    slot (the boundary pages come out of the cache); ``spare`` = N cached pages and free slots
    for every timed step; ``empty`` = the same plan with nothing cached but the batch's own
    prompts (N slots free); ``off`` = no prefix cache. Targets compare full and spare to empty.
(d) memory per cached entry: tracemalloc's net traced bytes over a separate build plus its
    first eviction (so the eviction heap exists), divided by the entries: the index (key bytes,
    key / parent lists, the per-group dict, the per-row arrays with their growth slack), the
    heap items (a tuple of five ints each), the manager's per-handle arrays. Arrays sized per
    GPU slot at construction (allocator reference counts and pin flags, free stack, the cache's
    slot -> row map) are given apart as bytes per slot (marginal over two pool sizes).

Noise control (a loaded 2-core box): every state is built first, then (a), (b), (c) run in
``--rounds`` rounds, each round visiting every N (in (c) the four modes alternate step by
step). With the vLLM peer present (``--peer-python``, default /tmp/vllm_peer/bin/python) its
BlockPools (benchmarks/vllm_peer_blockpool.py --serve) are built too and each round ends with
the peer's share: ``get_new_blocks(64)`` evicting 64 of N cached blocks, and
``get_num_free_blocks()``.
Reported: medians over all repeats / steps of all rounds, of wall time and of the thread's CPU
time (which leaves out the slices other processes took).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import InvariantError
from hybridkv.core.types import GPU
from hybridkv.layouts.spec import ModelLayout, attention_layer
from hybridkv.lifecycles import Full
from hybridkv.manager.manager import KVCacheManager, ManagerConfig
from hybridkv.manager.tiers import StorageConfig
from hybridkv.planning.planner import PlanSpec, plan
from hybridkv.scheduler.request import SeqRequest
from hybridkv.scheduler.scheduler import Scheduler, SchedulerConfig, StepPlan

TPB, PROMPT_TOKENS, PAGES = 16, 1024, 64
FILL_BATCH = 512
BATCH, MAX_SEQ_LEN = 64, 4096
MODES = ("full", "spare", "empty", "off")
PEER_PYTHON = Path("/tmp/vllm_peer/bin/python")
PEER_SCRIPT = Path(__file__).with_name("vllm_peer_blockpool.py")
I32 = npt.NDArray[np.int32]


@dataclass(frozen=True)
class Timing:
    """Medians (µs) of wall time and of this thread's CPU time: on a loaded machine the wall
    time also counts the slices other processes took while the timed code was running."""

    wall_us: float
    cpu_us: float


class Samples:
    """Wall and thread CPU durations of timed calls."""

    def __init__(self) -> None:
        self.wall_ns: list[int] = []
        self.cpu_ns: list[int] = []

    def time(self, fn: Callable[[], object]) -> object:
        w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        out = fn()
        c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
        self.wall_ns.append(w1 - w0)
        self.cpu_ns.append(c1 - c0)
        return out

    def median(self) -> Timing:
        return Timing(statistics.median(self.wall_ns) / 1e3, statistics.median(self.cpu_ns) / 1e3)


@dataclass(frozen=True)
class ScaleResult:
    """One N: medians in microseconds (``first_evict_ms``: one call), memory in bytes."""

    entries: int
    build_s: float
    step64: Timing
    evict64: Timing
    first_evict_ms: float
    reclaimable_us: float
    schedule: dict[str, Timing]  # per mode of MODES
    bytes_per_entry: float
    bytes_per_slot: float

    def schedule_ratio(self, mode: str, cpu: bool = False) -> float:
        """``mode``'s step against the empty cache's (full: boundary pages evicted; spare: not)."""
        a, b = self.schedule[mode], self.schedule["empty"]
        return a.cpu_us / b.cpu_us if cpu else a.wall_us / b.wall_us


class Prompts:
    """Distinct prompts: token 0 is a serial number, so every block key differs."""

    def __init__(self, seed: int) -> None:
        self.rng, self.next = np.random.default_rng(seed), 0

    def take(self, count: int, tokens: int = PROMPT_TOKENS) -> I32:
        out = self.rng.integers(0, 50_000, (count, tokens), dtype=np.int32)
        out[:, 0] = np.arange(self.next, self.next + count, dtype=np.int32)
        self.next += count
        return out


def make_manager(num_slots: int, max_active: int, prefix: bool = True) -> KVCacheManager:
    """Bookkeeping-only manager with exactly ``num_slots`` GPU slots and no host tier."""
    layout = ModelLayout("bench-full", (attention_layer(8, 128, 2, Full()),))
    spec = PlanSpec(layout, num_slots * TPB * 8 * 128 * 2 * 2, MAX_SEQ_LEN, TPB, max_batch_size=1)
    m = KVCacheManager(plan(spec), ManagerConfig(max_active_requests=max_active,
                                                 storage=StorageConfig(with_data=False)))
    if m.plan.slots != (num_slots,):
        raise InvariantError(f"bench: planned {m.plan.slots} slots, wanted {num_slots}")
    if prefix:
        m.enable_prefix_cache(offload_to_host=False)
    return m


def fill(m: KVCacheManager, entries: int, prompts: Prompts) -> None:
    """Publish ``entries`` pages (64 per prompt, the last prompt partial) and close their requests."""
    assert m.prefix is not None
    left = entries
    while left:
        count = min(FILL_BATCH, -(-left // PAGES))
        toks = prompts.take(count)
        pages = np.full(count, PAGES, np.int64)
        pages[-1] = min(PAGES, left - PAGES * (count - 1))
        handles = [m.open() for _ in range(count)]
        if None in handles or m.step(np.array(handles), pages * TPB, np.zeros(count, np.int64)) is None:
            raise InvariantError(f"bench: filling the cache ran out of rows or slots, {left} entries to go")
        for h, t, n in zip(handles, toks, pages.tolist(), strict=True):
            assert h is not None
            m.prefix.publish(h, t, n * TPB)
            m.close(h)
        left -= int(pages.sum())


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e3


class EvictState:
    """(a) and (b): a cache of N pages in N GPU slots."""

    def __init__(self, entries: int) -> None:
        self.entries, self.m, self.prompts = entries, make_manager(entries, FILL_BATCH), Prompts(entries)
        t0 = time.perf_counter()
        fill(self.m, entries, self.prompts)
        self.build_s = time.perf_counter() - t0
        assert self.m.prefix is not None
        self.prefix = self.m.prefix
        if self.prefix.reclaimable() != [entries] or self.m.tiers.free_slots(GPU) != [0]:
            raise InvariantError(f"bench: after the build {self.prefix.reclaimable()} reclaimable, "
                                 f"{self.m.tiers.free_slots(GPU)} free")
        gc.collect()
        self.first_evict_ms = timed(lambda: self.prefix.evict([PAGES])) / 1e3
        self.refill()
        self.step, self.evict = Samples(), Samples()
        self.reclaimable_us: list[float] = []

    def refill(self) -> None:
        """Untimed: a new request takes 64 slots (free or from the cache), is published, closed."""
        h = self.m.open()
        assert h is not None
        if self.m.step([h], [PROMPT_TOKENS], [0]) is None:
            raise InvariantError("bench: refill step refused")
        self.prefix.publish(h, self.prompts.take(1)[0], PROMPT_TOKENS)
        self.m.close(h)

    def round(self, repeats: int) -> None:
        m, prefix = self.m, self.prefix
        for _ in range(repeats):
            evicted = prefix.stats.evicted_pages
            h = m.open()
            assert h is not None
            gc.collect()
            self.step.time(lambda: m.step([h], [PROMPT_TOKENS], [0]))  # noqa: B023 (called at once)
            prefix.publish(h, self.prompts.take(1)[0], PROMPT_TOKENS)
            m.close(h)
            gc.collect()
            self.evict.time(lambda: prefix.evict([PAGES]))
            self.refill()
            if prefix.stats.evicted_pages - evicted != 2 * PAGES or m.tiers.free_slots(GPU) != [0]:
                raise InvariantError("bench: a repeat did not evict 2 x 64 cached pages")
        self.reclaimable_us += [timed(prefix.reclaimable) for _ in range(1000 // max(1, repeats))]


class SchedState:
    """(c): a Scheduler over 64 decoding requests in one of MODES (see the module docstring).
    GPU slots: N + ``held`` (the batch's pages after warm-up) [+ ``spare``]."""

    def __init__(self, entries: int, mode: str, held: int | None = None, spare: int = 0) -> None:
        spare = spare if mode == "spare" else 0
        slots = entries + spare + (held if held is not None else BATCH * MAX_SEQ_LEN // TPB)
        self.m = make_manager(slots, BATCH + FILL_BATCH, prefix=mode != "off")
        self.s = Scheduler(self.m, SchedulerConfig(max_batch_size=BATCH))
        prompts = Prompts(10**9 + entries)
        for i in range(BATCH):
            toks = prompts.take(1, PROMPT_TOKENS + i % TPB)[0]
            self.s.submit(SeqRequest(i, toks.size, MAX_SEQ_LEN - toks.size, tokens=toks))
        self.now = 0.0
        while self.s.num_waiting or any(t.generated < 2 for t in self.s.requests.values()):
            self.step()
        self.held = self.m.tiers.allocators[GPU][0].num_in_use
        if mode in ("full", "spare"):
            fill(self.m, entries, prompts)
            if self.m.tiers.free_slots(GPU) != [spare]:
                raise InvariantError(f"bench: {self.m.tiers.free_slots(GPU)} slots free after the fill")
        self.times = Samples()

    def step(self) -> StepPlan:
        plan_ = self.s.schedule()
        self.s.complete(plan_, self.now)
        self.now += 0.01
        return plan_

    def timed_step(self) -> None:
        plan_ = self.times.time(self.step)
        assert isinstance(plan_, StepPlan)
        if plan_.handles.size != BATCH or int(plan_.num_tokens.sum()) != BATCH:
            raise InvariantError("bench: the batch stopped decoding 64 tokens per step")

    @property
    def evicted(self) -> int:
        return self.m.prefix.stats.evicted_pages if self.m.prefix is not None else 0


def sched_states(entries: int, steps: int) -> dict[str, SchedState]:
    held = SchedState(0, "empty").held  # so the full state has no free slot after its fill
    spare = BATCH * (steps // TPB + 2)  # the slots every timed step of the batch takes, and more
    return {mode: SchedState(entries, mode, held, spare) for mode in MODES}


def check_evictions(states: dict[str, SchedState], steps: int) -> None:
    got = {mode: st.evicted for mode, st in states.items()}
    if got["full"] < steps or got["spare"] or got["empty"]:
        raise InvariantError(f"bench: pages evicted per mode {got}: only full should evict, every step")


def traced(fn: Callable[[], object]) -> tuple[object, int]:
    """``fn()`` and the net bytes tracemalloc saw it keep (tracing must be on)."""
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    out = fn()
    gc.collect()
    return out, tracemalloc.get_traced_memory()[0] - before


def memory_costs(entries: int) -> tuple[float, float]:
    """(d): bytes per cached entry (a build and its first eviction, which builds the heap),
    and bytes per GPU slot allocated at construction (marginal over two pool sizes)."""
    small = 4 * MAX_SEQ_LEN // TPB
    tracemalloc.start()
    try:
        _, small_bytes = traced(lambda: make_manager(small, FILL_BATCH))
        m, big_bytes = traced(lambda: make_manager(entries, FILL_BATCH))
        assert isinstance(m, KVCacheManager) and m.prefix is not None
        prefix, prompts = m.prefix, Prompts(entries)

        def build() -> None:
            fill(m, entries, prompts)
            prefix.evict([PAGES])

        _, net = traced(build)
    finally:
        tracemalloc.stop()
    return net / (entries - PAGES), (big_bytes - small_bytes) / (entries - small)


class Peer:
    """benchmarks/vllm_peer_blockpool.py --serve in the peer's interpreter: builds its pools
    once, then runs one round per request line."""

    KEYS = ("get_new_blocks_us", "get_new_blocks_cpu_us", "get_num_free_blocks_us")

    def __init__(self, python: Path, entries: list[int]) -> None:
        cmd = [str(python), str(PEER_SCRIPT), "--serve", "--entries", *map(str, entries)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info: dict[str, Any] = self._read()
        self.samples: dict[int, dict[str, list[float]]] = {n: {k: [] for k in self.KEYS} for n in entries}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"vLLM peer exited with {self.proc.wait()}")
        out: dict[str, Any] = json.loads(line)
        return out

    def round(self, repeats: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{repeats}\n")
        self.proc.stdin.flush()
        for n, r in self._read()["rounds"].items():
            for k in self.KEYS:
                self.samples[int(n)][k] += r[k]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()

    def summary(self, entries: int) -> dict[str, Any]:
        medians = {k: statistics.median(v) for k, v in self.samples[entries].items()}
        return {"version": self.info["peer"], **self.info["pools"][str(entries)], **medians}


def run(entries: list[int], repeats: int, steps: int, rounds: int, peer_python: Path | None,
        check: bool) -> tuple[list[ScaleResult], list[dict[str, Any] | None]]:
    ev = {n: EvictState(n) for n in entries}
    sched = {n: sched_states(n, steps) for n in entries}
    peer = Peer(peer_python, entries) if peer_python is not None else None
    for r in range(rounds):
        print(f"round {r + 1}/{rounds} ...", file=sys.stderr, flush=True)
        for n in entries:
            ev[n].round(-(-repeats // rounds))
            gc.collect()
            for _ in range(steps // rounds):  # modes alternate step by step: a burst of load hits all
                for st in sched[n].values():
                    st.timed_step()
        if peer is not None:
            peer.round(-(-repeats // rounds))
    if peer is not None:
        peer.close()
    results = []
    for n in entries:
        check_evictions(sched[n], steps)
        if check:
            ev[n].m.check_invariants()
        e, times = ev.pop(n), {mode: st.times.median() for mode, st in sched.pop(n).items()}
        gc.collect()
        per_entry, per_slot = memory_costs(n)
        results.append(ScaleResult(n, e.build_s, e.step.median(), e.evict.median(), e.first_evict_ms,
                                   statistics.median(e.reclaimable_us), times, per_entry, per_slot))
    return results, [peer.summary(n) if peer is not None else None for n in entries]


def print_tables(results: list[ScaleResult], peers: list[dict[str, Any] | None]) -> None:
    """Medians, wall time with thread CPU time in parentheses."""
    def t(x: Timing) -> str:
        return f"{x.wall_us:,.0f} ({x.cpu_us:,.0f})"

    print("| N cached | step needing 64 from cache µs | evict 64 µs | vLLM get_new_blocks(64) µs | step / vLLM "
          "| evict / vLLM | first evict after build ms | reclaimable() µs | vLLM get_num_free_blocks() µs "
          "| schedule full / empty | schedule full, spare room / empty | bytes per entry (+ per slot) "
          "| vLLM bytes per cached block (+ per block) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r, p in zip(results, peers, strict=True):
        vllm, vllm_free, vllm_mem = ["—"] * 3, "—", "—"
        if p:
            w, c = p["get_new_blocks_us"], p["get_new_blocks_cpu_us"]
            vllm = [f"{w:,.0f} ({c:,.0f})", f"{r.step64.wall_us / w:.1f}x ({r.step64.cpu_us / c:.1f}x)",
                    f"{r.evict64.wall_us / w:.1f}x ({r.evict64.cpu_us / c:.1f}x)"]
            vllm_free = f"{p['get_num_free_blocks_us']:.2f}"
            vllm_mem = f"{p['bytes_per_entry']:,.0f} (+{p['bytes_per_block']:,.0f})"
        ratios = [f"{r.schedule_ratio(m):.2f}x ({r.schedule_ratio(m, cpu=True):.2f}x)" for m in ("full", "spare")]
        cells = [f"{r.entries:,}", t(r.step64), t(r.evict64), *vllm, f"{r.first_evict_ms:,.1f}",
                 f"{r.reclaimable_us:.2f}", vllm_free, *ratios, f"{r.bytes_per_entry:,.0f} (+{r.bytes_per_slot:.0f})",
                 vllm_mem]
        print("| " + " | ".join(cells) + " |")
    print("\n| N cached | hybridkv build s | vLLM fill s (under tracemalloc) | schedule()+complete() µs: full "
          "| full, spare room | empty | prefix cache off |")
    print("|---|---|---|---|---|---|---|")
    for r, p in zip(results, peers, strict=True):
        sched = " | ".join(t(r.schedule[k]) for k in MODES)
        print(f"| {r.entries:,} | {r.build_s:.1f} | {p['build_s']:.1f} | {sched} |" if p else
              f"| {r.entries:,} | {r.build_s:.1f} | — | {sched} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--entries", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=60, help="(a) repeats per N, over all rounds")
    ap.add_argument("--steps", type=int, default=480, help="(c) timed steps per mode and N, over all rounds")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    ap.add_argument("--check", action="store_true", help="check_invariants() after (a) (slow at 10^6)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    peer_python = args.peer_python if args.peer_python.exists() else None
    results, peers = run(args.entries, args.repeats, args.steps, args.rounds, peer_python, args.check)
    if args.json:
        print(json.dumps({"python": platform.python_version(), "numpy": np.__version__, "peer": peers,
                          "results": [{**asdict(r), "schedule_ratio": r.schedule_ratio("full"),
                                       "spare_ratio": r.schedule_ratio("spare")} for r in results]}))
        return
    print(f"Python {platform.python_version()}, NumPy {np.__version__}; (a) {args.repeats} repeats, (c) {args.steps} "
          f"steps per mode, in {args.rounds} rounds over every N; medians: wall µs (thread CPU µs)\n")
    print_tables(results, peers)
    if peer_python is None:
        print(f"\n(vLLM peer not run: {args.peer_python} is missing; see benchmarks/vllm_peer_blockpool.py)")


if __name__ == "__main__":
    main()
