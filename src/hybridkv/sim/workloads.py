"""Seeded synthetic workloads for the simulator.

A workload is a tuple of *sessions*; a session is one or more *turns* (requests). The first
turn arrives at the session's ``arrival_s``; each later turn arrives when the previous one
finished plus its ``think_s`` (so multi-turn arrivals depend on the simulation and are not
fixed here). Every turn respects ``max_seq_len``: prompt + outputs - 1 <= max_seq_len.

Workloads (lengths in tokens, L = max_seq_len):

- ``chat``: prompts lognormal, median 1000, capped at L/2; outputs lognormal, median 250.
- ``long-context``: prompts uniform in [0.5 L, 0.9 L]; outputs uniform in [64, 512].
- ``decode-heavy``: prompts uniform in [64, 256]; outputs uniform in [1024, 4096] (run it
  with a large --max-batch-size: many requests decode at once).
- ``multi-turn``: conversations of 3-8 turns; each turn resends the whole conversation so far
  plus a new user message (no prefix reuse yet: a fresh request each turn) after a think time
  (exponential, mean 2 s) from the end of the previous turn. A conversation stops early
  rather than pass L.
- ``issue-15401``: prompts uniform over the whole length range [tpb, L - output + 1], outputs
  uniform in [tpb, 2 tpb] so decodes cross every position mod tokens_per_block (the window
  straddle of every windowed group). Meant for the ``issue-15401`` catalog layout with
  --tokens-per-block 256 --max-seq-len 137984 --max-batch-size 64.

Arrivals: with ``rate_per_s`` sessions arrive as a Poisson process (exponential gaps, first
at its first gap); without, all at t = 0 (offline). ``num_requests`` counts turns: a
multi-turn workload holds exactly that many requests over its conversations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_REQUESTS, check_max

MAX_SEED = (1 << 64) - 1
MIN_RATE_PER_S, MAX_RATE_PER_S = 1e-6, 1e9  # a session every 11.6 days .. every nanosecond: times stay finite

Rng = np.random.Generator


@dataclass(frozen=True, slots=True)
class Turn:
    """One request of a session; ``think_s``: delay after the previous turn finished."""

    prompt_tokens: int
    max_new_tokens: int
    think_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Session:
    """A user's requests in order; the first arrives at ``arrival_s``."""

    arrival_s: float
    turns: tuple[Turn, ...]


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """What to generate. Validated once."""

    name: str
    max_seq_len: int
    tokens_per_block: int
    num_requests: int | None = None  # None: the workload's default
    seed: int = 0
    rate_per_s: float | None = None  # None: all sessions at t = 0

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ConfigError(f"unknown workload {self.name!r}; use one of {', '.join(WORKLOADS)}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ConfigError(f"--requests must be >= 1, got {self.num_requests}")
        check_max("--requests", self.num_requests or 0, MAX_REQUESTS, "simulate fewer requests")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be in [0, 2^64 - 1] (NumPy seeds are unsigned), got {self.seed}")
        if self.max_seq_len < 2 or self.tokens_per_block < 1:
            raise ConfigError(f"workload needs max_seq_len >= 2 and tokens_per_block >= 1, got "
                              f"{self.max_seq_len} and {self.tokens_per_block}")
        if self.rate_per_s is not None and not (math.isfinite(self.rate_per_s) and self.rate_per_s > 0):
            raise ConfigError(f"--rate must be > 0 requests/s and finite, got {self.rate_per_s}")
        if self.rate_per_s is not None and not MIN_RATE_PER_S <= self.rate_per_s <= MAX_RATE_PER_S:
            raise ConfigError(f"--rate must be in [{MIN_RATE_PER_S:g}, {MAX_RATE_PER_S:g}] per second so that "
                              f"arrival times stay finite, got {self.rate_per_s:g}")


@dataclass(frozen=True, slots=True)
class Workload:
    """Generated sessions and the spec they came from."""

    spec: WorkloadSpec
    sessions: tuple[Session, ...]

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


def _fit(prompt: float, out: float, max_seq_len: int) -> Turn:
    """A turn clipped so prompt >= 1, out >= 1 and prompt + out - 1 <= max_seq_len."""
    p = int(min(max(round(prompt), 1), max_seq_len))
    return Turn(p, int(min(max(round(out), 1), max_seq_len - p + 1)))


def _lognormal(rng: Rng, median: float, sigma: float) -> float:
    return float(rng.lognormal(np.log(median), sigma))


def _uniform(rng: Rng, lo: int, hi: int) -> int:
    """An integer in [lo, hi], both ends included."""
    return int(rng.integers(lo, hi + 1))


def _chat(spec: WorkloadSpec, rng: Rng, n: int) -> list[tuple[Turn, ...]]:
    cap = max(1, spec.max_seq_len // 2)
    return [(_fit(min(_lognormal(rng, 1000, 1.0), cap), _lognormal(rng, 250, 0.8), spec.max_seq_len),)
            for _ in range(n)]


def _long_context(spec: WorkloadSpec, rng: Rng, n: int) -> list[tuple[Turn, ...]]:
    lo, hi = max(1, spec.max_seq_len // 2), max(1, spec.max_seq_len * 9 // 10)
    return [(_fit(_uniform(rng, lo, hi), _uniform(rng, 64, 512), spec.max_seq_len),) for _ in range(n)]


def _decode_heavy(spec: WorkloadSpec, rng: Rng, n: int) -> list[tuple[Turn, ...]]:
    return [(_fit(_uniform(rng, 64, 256), _uniform(rng, 1024, 4096), spec.max_seq_len),) for _ in range(n)]


def _issue_15401(spec: WorkloadSpec, rng: Rng, n: int) -> list[tuple[Turn, ...]]:
    tpb, max_len = spec.tokens_per_block, spec.max_seq_len
    out: list[tuple[Turn, ...]] = []
    for _ in range(n):
        new = _uniform(rng, tpb, 2 * tpb)
        hi = max(1, max_len - new + 1)
        out.append((_fit(_uniform(rng, min(tpb, hi), hi), new, max_len),))
    return out


def _conversation(spec: WorkloadSpec, rng: Rng, max_turns: int) -> tuple[Turn, ...]:
    turns: list[Turn] = []
    context = 0
    for i in range(min(_uniform(rng, 3, 8), max_turns)):
        user = _lognormal(rng, 600 if i == 0 else 150, 0.8)
        t = _fit(context + user, _lognormal(rng, 250, 0.7), spec.max_seq_len)
        think = float(rng.exponential(2.0)) if i else 0.0
        if turns and t.prompt_tokens + t.max_new_tokens - 1 >= spec.max_seq_len:
            break  # the conversation would pass max_seq_len: it ends here
        turns.append(Turn(t.prompt_tokens, t.max_new_tokens, think))
        context = t.prompt_tokens + t.max_new_tokens
    return tuple(turns)


def _multi_turn(spec: WorkloadSpec, rng: Rng, n: int) -> list[tuple[Turn, ...]]:
    out: list[tuple[Turn, ...]] = []
    left = n
    while left > 0:
        conv = _conversation(spec, rng, left)
        out.append(conv)
        left -= len(conv)
    return out


@dataclass(frozen=True, slots=True)
class WorkloadDef:
    """A workload generator and its default request count."""

    make: Callable[[WorkloadSpec, Rng, int], list[tuple[Turn, ...]]]
    default_requests: int


WORKLOADS: dict[str, WorkloadDef] = {
    "chat": WorkloadDef(_chat, 512),
    "long-context": WorkloadDef(_long_context, 64),
    "decode-heavy": WorkloadDef(_decode_heavy, 1024),
    "multi-turn": WorkloadDef(_multi_turn, 512),
    "issue-15401": WorkloadDef(_issue_15401, 64),
}


def make_workload(spec: WorkloadSpec) -> Workload:
    """Generate ``spec``'s sessions; the same spec (seed included) gives the same workload."""
    wd = WORKLOADS[spec.name]
    n = spec.num_requests if spec.num_requests is not None else wd.default_requests
    rng = np.random.default_rng(spec.seed)
    convs = wd.make(spec, rng, n)
    if spec.rate_per_s is None:
        arrivals = np.zeros(len(convs))
    else:
        arrivals = np.cumsum(rng.exponential(1.0 / spec.rate_per_s, len(convs)))
    return Workload(spec, tuple(Session(float(a), c) for a, c in zip(arrivals, convs, strict=True)))
