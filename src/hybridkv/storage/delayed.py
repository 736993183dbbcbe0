"""A lower tier whose transfers finish later: the stand-in for a remote tier in tests.

It shows that a remote tier is one new file plus a registration: importing this module
registers the "delayed" backend, and ``TierSpec("remote", "delayed", nbytes,
{"delay_polls": 3})`` puts it in a manager's tier list. The bytes live in host memory (so
tests and the fake engine can read them back), but a job moves them only when it finishes:
after ``delay_polls`` polls, or when the test ``release``s it (``delay_polls=None``: only
then). Moving the bytes at completion, not at submission, is what a tier reading the GPU by
RDMA does, and it is the point of the test: had the manager reused a source slot while a
store was pending, the tier would store the new owner's bytes and the read-back would show it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hybridkv.core.errors import ConfigError, UsageError
from hybridkv.storage.backends import NumpyBuffer, PoolBuffer, register_backend
from hybridkv.storage.jobs import JobId, SlotArray


@dataclass(slots=True)
class _Job:
    run: Callable[[], None]  # the copy, done when the job finishes
    polls: int = 0


class DelayedBuffer(NumpyBuffer):
    """Host bytes whose store and load jobs finish after ``delay_polls`` polls or on release."""

    kind = "delayed"

    def __init__(self, num_slots: int, slot_bytes: int, delay_polls: int | None = 1) -> None:
        if delay_polls is not None and delay_polls < 1:
            raise ConfigError(f"delayed tier: delay_polls must be >= 1 or None, got {delay_polls}")
        super().__init__(num_slots, slot_bytes)
        self.delay_polls = delay_polls
        self._jobs: dict[JobId, _Job] = {}
        self._released: set[JobId] = set()
        self.polls = 0

    def store(self, job: JobId, src: PoolBuffer, src_slots: SlotArray, slots: SlotArray) -> bool:
        s, d = src_slots.copy(), slots.copy()
        return self._submit(job, lambda: self.write(d, src.read(s)))

    def load(self, job: JobId, slots: SlotArray, dst: PoolBuffer, dst_slots: SlotArray) -> bool:
        s, d = slots.copy(), dst_slots.copy()
        return self._submit(job, lambda: dst.write(d, self.read(s)))

    def _submit(self, job: JobId, run: Callable[[], None]) -> bool:
        if job in self._jobs:
            raise UsageError(f"delayed tier: job {job} submitted twice")
        self._jobs[job] = _Job(run)
        return False

    def finished(self) -> list[JobId]:
        self.polls += 1
        done = []
        for job, j in list(self._jobs.items()):
            j.polls += 1
            if job in self._released or (self.delay_polls is not None and j.polls >= self.delay_polls):
                j.run()
                del self._jobs[job]
                self._released.discard(job)
                done.append(job)
        return done

    @property
    def pending(self) -> list[JobId]:
        """Jobs submitted and not finished yet, oldest first."""
        return list(self._jobs)

    def release(self) -> None:
        """Let every pending job finish at the next poll (whatever ``delay_polls`` says)."""
        self._released.update(self._jobs)


register_backend("delayed", DelayedBuffer)
