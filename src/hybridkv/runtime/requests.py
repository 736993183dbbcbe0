"""The engine's record of a generation request (its token ids, sampling settings, outputs)
and what a step hands a streaming client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError

if TYPE_CHECKING:
    import torch


class TokenEvent(NamedTuple):
    """One new token of one request: at ``position`` of its sequence; ``finished`` when it was
    the last. ``logits`` (float32, the vocabulary) only with ``EngineConfig.keep_logits``."""

    request_id: int
    token: int
    position: int
    finished: bool
    logits: torch.Tensor | None = None


PENDING = -1  # a token sampled on the device whose value the host has not read yet


@dataclass(slots=True)
class GenRequest:
    """A request's tokens: ``tokens[:known]`` are the prompt and the outputs so far; the array
    has room for every output, so the scheduler's prefix cache reads the same array as it grows.

    A sampled token is first reserved (``PENDING`` at ``known``; the next step's input reads
    it on the device) and then resolved, when the host reads its value. An engine that
    overlaps steps resolves a step's tokens after launching the next one, so the last
    ``pending`` (at most two) of ``tokens[:known]`` may still be placeholders."""

    request_id: int
    tokens: npt.NDArray[np.int32]
    prompt_tokens: int
    max_new_tokens: int
    temperature: float  # 0: greedy
    seed: int  # the draws' seed (runtime/sampling.py): a token depends on it, its position and its logits
    stop_token_ids: frozenset[int] = frozenset()
    known: int = 0
    pending: int = 0
    finished: bool = False
    outputs: list[int] = field(default_factory=list)

    @classmethod
    def new(cls, request_id: int, prompt_ids: npt.ArrayLike, max_new_tokens: int, temperature: float,
            seed: int | None, vocab_size: int, stop_token_ids: frozenset[int] = frozenset()) -> GenRequest:
        prompt = np.asarray(prompt_ids, dtype=np.int64).ravel()
        if prompt.size < 1 or max_new_tokens < 1:
            raise ConfigError(f"request {request_id}: prompt_ids ({prompt.size} tokens) and max_new_tokens "
                              f"({max_new_tokens}) must be >= 1")
        if prompt.min() < 0 or prompt.max() >= vocab_size:
            raise ConfigError(f"request {request_id}: prompt_ids must be in 0..{vocab_size - 1} (the model's "
                              f"vocab_size), got {int(prompt.min())}..{int(prompt.max())}")
        if not temperature >= 0.0:
            raise ConfigError(f"request {request_id}: temperature must be >= 0 (0 is greedy), got {temperature}")
        tokens = np.zeros(prompt.size + max_new_tokens, np.int32)
        tokens[:prompt.size] = prompt
        if seed is not None and not 0 <= seed < 2**63:
            raise ConfigError(f"request {request_id}: seed must be in 0..2**63-1, got {seed}")
        return cls(request_id, tokens, int(prompt.size), max_new_tokens, temperature,
                   seed if seed is not None else request_id, stop_token_ids, int(prompt.size))

    def reserve(self) -> None:
        """A step sampled this request's next token on the device: hold its place."""
        self.tokens[self.known] = PENDING
        self.known += 1
        self.pending += 1

    def resolve(self, token: int) -> bool:
        """The value of the oldest reserved token. The request is finished at
        ``max_new_tokens`` or a stop token; a token sampled after it finished (the step after
        a stop token was launched before the stop was read) is dropped: False."""
        first = self.known - self.pending
        self.pending -= 1
        if self.finished:
            self.known -= 1  # (the dropped one is the last placeholder)
            self.tokens[self.known] = 0
            return False
        self.tokens[first] = token
        self.outputs.append(token)
        self.finished = len(self.outputs) == self.max_new_tokens or token in self.stop_token_ids
        return True
