"""The rotary function swap (``runtime/rotary.py``): the model calls the installed function in
place of its modeling module's own, with the same logits; ``uninstall`` puts the original
back; an engine off the GPU leaves (or puts back) the module's own function."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
torch.set_num_threads(1)

from hybridkv.runtime import rotary  # noqa: E402
from hybridkv.runtime.engine import Engine, EngineConfig  # noqa: E402
from hybridkv.runtime.model import build_model  # noqa: E402

GEMMA3 = "transformers.models.gemma3.modeling_gemma3"


class Counting:
    """A stand-in compiler: the function itself, counting its calls."""

    def __init__(self) -> None:
        self.calls = self.compiled = 0

    def __call__(self, function: Callable[..., Any]) -> Callable[..., Any]:
        self.compiled += 1

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return function(*args, **kwargs)
        return counted


def engine(model: Any) -> Engine:
    eng = Engine(model, EngineConfig(gpu_bytes=1 << 20, host_bytes=0, max_seq_len=64, tokens_per_block=4,
                                     max_batch_size=4, token_budget=32, prefill_chunk_tokens=8, keep_logits=True))
    for p in ([1, 2, 3, 4, 5], list(range(20, 33))):
        eng.add_request(np.array(p), 4)
    return eng


def test_the_installed_function_runs_in_place_of_the_modules_own() -> None:
    model = build_model("gemma3_text", seed=0)
    original = sys.modules[GEMMA3].apply_rotary_pos_emb
    plain = [e.logits for e in engine(model).stream()]
    eng = engine(model)  # (a CPU engine keeps the module's own function: install after it)
    assert eng.rotary == [] and sys.modules[GEMMA3].apply_rotary_pos_emb is original
    counting = Counting()
    try:
        assert rotary.install(model, counting) == [GEMMA3]
        assert rotary.install(model, counting) == [GEMMA3] and counting.compiled == 1  # once per module
        assert sys.modules[GEMMA3].apply_rotary_pos_emb is not original
        mine = [e.logits for e in eng.stream()]
        steps = counting.calls // model.config.num_hidden_layers
        assert steps > 0 and counting.calls == steps * model.config.num_hidden_layers  # every layer, every step
        assert len(mine) == len(plain) and all(torch.equal(a, b) for a, b in zip(mine, plain, strict=True))
        engine(model)  # an engine that does not compile gives the original back
        assert sys.modules[GEMMA3].apply_rotary_pos_emb is original
        rotary.install(model, counting)
    finally:
        assert rotary.uninstall(model) == 1
    assert sys.modules[GEMMA3].apply_rotary_pos_emb is original and rotary.uninstall(model) == 0
