"""The decode-graph bookkeeping (``runtime/graphs.py``): which batch sizes are captured,
which steps a graph may replay, and the padded static step against the plain one."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
torch.set_num_threads(1)

from hybridkv.runtime.engine import Engine, EngineConfig  # noqa: E402
from hybridkv.runtime.graphs import failed_at, graph_sizes  # noqa: E402
from hybridkv.runtime.model import build_model  # noqa: E402
from hybridkv.runtime.packing import HostStep  # noqa: E402


def test_graph_sizes() -> None:
    assert graph_sizes(1) == (1,)
    assert graph_sizes(8) == (1, 2, 4, 8)
    assert graph_sizes(40) == (1, 2, 4, 8, 16, 32, 40)
    sizes = graph_sizes(256)
    assert len(sizes) == 4 + 16 and sizes[-2:] == (240, 256)


def host(q_row: list[int], emit_at: list[int], rows: list[int]) -> HostStep:
    n = len(q_row)
    return HostStep(np.zeros(n, np.int64), np.array(q_row), np.arange(n), np.ones(4, np.int32), (),
                    np.array(emit_at, np.int64), np.array(rows, np.int64), (), ())


def test_only_a_step_that_decodes_every_row_is_a_decode_step() -> None:
    assert host([0, 2, 3], [0, 1, 2], [0, 2, 3]).is_decode
    assert not host([0, 0, 1], [1, 2], [0, 1]).is_decode  # row 0 prefills two tokens
    assert not host([0, 1], [1], [1]).is_decode  # row 0's chunk does not end its prompt


def test_padded_static_decode_steps_give_the_plain_steps_logits() -> None:
    """The same requests through the padded static step ("eager") and the plain one: the
    same tokens and logits to float32 rounding, each decode step of n rows padded to the
    next captured size (3 -> 4, 5 -> 8)."""
    def run(mode: str) -> tuple[list[list[int]], list[torch.Tensor], int]:
        engine = Engine(build_model("gemma3_text", seed=2), EngineConfig(
            gpu_bytes=1 << 20, host_bytes=0, max_seq_len=64, tokens_per_block=4, max_batch_size=8,
            token_budget=64, prefill_chunk_tokens=8, keep_logits=True, decode_graphs=mode))
        rng = np.random.default_rng(3)
        ids = [engine.add_request(rng.integers(0, 256, n), 10) for n in (5, 11, 3, 17, 8)]
        events = list(engine.stream())
        return [engine.requests[i].outputs for i in ids], [e.logits for e in events], engine.graph_steps

    plain, plain_logits, plain_graph_steps = run("off")
    padded, padded_logits, graph_steps = run("eager")
    assert padded == plain and plain_graph_steps == 0 and graph_steps > 0
    assert max(float((a - b).abs().max()) for a, b in zip(padded_logits, plain_logits, strict=True)) < 1e-5


def test_a_state_family_with_every_slot_held_leaves_no_spare_for_padding_rows() -> None:
    """A padding row of a recurrent model's static step reads and writes back a spare state
    slot, one that none of the step's rows holds; with every slot of the pool held there is
    none, and the step runs without the graph."""
    engine = Engine(build_model("qwen3_next", seed=0), EngineConfig(
        gpu_bytes=1 << 20, host_bytes=0, max_seq_len=64, tokens_per_block=4, max_batch_size=8, token_budget=64,
        prefill_chunk_tokens=8, decode_graphs="eager"))
    graphs = engine.graphs
    assert graphs is not None and graphs.state_families
    (f, slots), = graphs.state_families.items()
    families = [np.full((3, t.shape[1], t.shape[2]), 0, np.int32) for t in graphs.families]
    families[f] = np.zeros((3, 1, graphs.families[f].shape[2]), np.int32)
    families[f][:, 0, :] = np.arange(3 * families[f].shape[2]).reshape(3, -1)
    step = HostStep(np.zeros(3, np.int64), np.arange(3), np.full(3, 5), np.full(3, 6), tuple(families),
                    np.arange(3), np.arange(3), (), ())
    assert graphs.fits(step) and graphs.spares(step) == [(f, families[f].size)]
    families[f][:, 0, :] = np.arange(slots - families[f].size, slots).reshape(3, -1)  # the top ids: 0 spare
    assert graphs.spares(step) == [(f, 0)] and graphs.fits(step)
    assert not graphs.fits(step._replace(q_pos=np.array([5, 0, 5])))  # a request without its state yet
    held = np.arange(slots)
    families[f] = np.resize(held, (3, 1, slots)).astype(np.int32)  # every slot held
    step = step._replace(families=tuple(families))
    assert graphs.spares(step) == [(f, slots)] and not graphs.fits(step)


class Upsample(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, size=3, mode="nope")  # (raises in torch's own Python)


def test_a_failed_capture_names_the_model_code_that_did_it() -> None:
    """``failed_at`` skips the torch package's frames: the reason names the function and line
    of the model's code where the capture stopped, also when that code lies under a directory
    named torch that is not the package (a virtual environment at /opt/torch, say)."""
    line = Upsample.forward.__code__.co_firstlineno + 1
    with pytest.raises(NotImplementedError) as err:
        Upsample()(torch.ones(1, 1, 2))  # (through Module.__call__ as well)
    assert failed_at(err.value) == f" in forward (tests/test_graphs.py:{line})"
    namespace: dict[str, Any] = {}
    source = "import torch\ndef experts(x):\n    return torch.nn.functional.interpolate(x, size=3, mode='nope')\n"
    exec(compile(source, "/opt/torch/.venv/site-packages/transformers/moe.py", "exec"), namespace)
    with pytest.raises(NotImplementedError) as err:
        namespace["experts"](torch.ones(1, 1, 2))
    assert failed_at(err.value) == " in experts (transformers/moe.py:3)"
    assert failed_at(ValueError("never raised")) == ""
