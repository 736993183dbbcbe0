"""The scheduler's settings and its policies by name.

``SchedulerConfig`` validates itself once; ``POLICIES`` maps each policy's name to its class
(one policy per file, below this module).
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridkv.core.errors import ConfigError
from hybridkv.scheduler.max_utilization import MaxUtilization
from hybridkv.scheduler.no_evict import NoEvict
from hybridkv.scheduler.policy import SchedulingPolicy

POLICIES: dict[str, type[SchedulingPolicy]] = {MaxUtilization.name: MaxUtilization, NoEvict.name: NoEvict}


def check_token_budget(token_budget: int, max_batch_size: int) -> None:
    """Every running request must be able to decode in one step."""
    if token_budget < max_batch_size:
        raise ConfigError(f"token_budget ({token_budget}) must be >= max_batch_size "
                          f"({max_batch_size}) so every running request can decode")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits, prefill chunking and the policy by name.
    ``max_batch_size`` defaults to the manager's active rows (the plan's ``max_batch_size``
    unless the manager was told otherwise): one home for the setting."""

    max_batch_size: int | None = None
    token_budget: int = 8192
    prefill_chunk_tokens: int = 2048
    policy: str = "max-utilization"

    def __post_init__(self) -> None:
        if (self.max_batch_size is not None and self.max_batch_size < 1) or self.prefill_chunk_tokens < 1:
            raise ConfigError("max_batch_size and prefill_chunk_tokens must be >= 1")
        if self.max_batch_size is not None:
            check_token_budget(self.token_budget, self.max_batch_size)
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; use one of {sorted(POLICIES)}")
