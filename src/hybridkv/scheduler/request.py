"""What clients ask for, and the scheduler's record of each request."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError


@dataclass(frozen=True, slots=True)
class SeqRequest:
    """A generation request: a prompt of ``prompt_tokens`` and up to ``max_new_tokens`` out."""

    request_id: int
    prompt_tokens: int
    max_new_tokens: int
    arrival_s: float = 0.0
    priority: int = 0
    # token ids (at least the prompt; the simulator passes prompt + outputs): with a prefix
    # cache the prompt is looked up and computed blocks are published
    tokens: npt.NDArray[np.int32] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"request {self.request_id}: prompt_tokens ({self.prompt_tokens}) and "
                              f"max_new_tokens ({self.max_new_tokens}) must be >= 1")

    @property
    def total_tokens(self) -> int:
        """KV positions the request can reach: the prompt plus every output but the last."""
        return self.prompt_tokens + self.max_new_tokens - 1


class Status(enum.Enum):
    WAITING = "waiting"  # never ran, or preempted (its KV dropped: it recomputes)
    RUNNING = "running"  # active in the manager
    SUSPENDED = "suspended"  # pages moved to a lower tier; resumes before newer requests
    FINISHED = "finished"
    REJECTED = "rejected"  # could never fit: refused at submission with ``reason``


class Progress:
    """Counters the scheduler updates for a whole batch at once (one NumPy operation per
    step, not an attribute write per request), indexed by arrival order (``Tracked.seq``)."""

    def __init__(self) -> None:
        self.generated = np.zeros(1024, np.int64)

    def reserve(self, seq: int) -> None:
        if seq >= self.generated.size:
            grown = np.zeros(max(2 * self.generated.size, seq + 1), np.int64)
            grown[:self.generated.size] = self.generated
            self.generated = grown


@dataclass(slots=True)
class Tracked:
    """The scheduler's record of one request (cold path: touched on admission and exit);
    ``generated`` lives in the scheduler's ``Progress`` arrays."""

    spec: SeqRequest
    seq: int  # arrival order: victims are chosen latest first, admission earliest first
    progress: Progress = field(default_factory=Progress, repr=False, compare=False)
    status: Status = Status.WAITING
    handle: int | None = None
    prefill_target: int = 0  # tokens to prefill (prompt, plus outputs after a preemption)
    first_token_s: float | None = None
    finish_s: float | None = None
    preemptions: int = 0
    suspensions: int = 0
    reason: str = ""
    reservation: tuple[int, ...] = field(default=())
    chunk_limit: int = 0  # 0: the scheduler's prefill_chunk_tokens; else a smaller cap (no-evict)

    @property
    def generated(self) -> int:
        """Output tokens so far."""
        return int(self.progress.generated[self.seq])

    @generated.setter
    def generated(self, value: int) -> None:
        self.progress.generated[self.seq] = value
