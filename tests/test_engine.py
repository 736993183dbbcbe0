"""The reference engine against plain transformers: tiny random models of each hybrid family run
several requests at once on hybridkv's pages (chunked prefill, decode past the window, a prefix
hit, suspend -> offload -> resume, a fork midway; Qwen3-Next's gated delta net states in
pages, sliced across layer groups in a shared arena); every token's logits must match the same
weights run per request through transformers' own attention and cache."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
torch.set_num_threads(1)

from hybridkv.core.errors import ConfigError, UsageError  # noqa: E402
from hybridkv.engine.paged_attention import paged_attention  # noqa: E402
from hybridkv.runtime import recurrent, rotary  # noqa: E402
from hybridkv.runtime.engine import Engine, EngineConfig  # noqa: E402
from hybridkv.runtime.model import build_model, model_layout  # noqa: E402
from hybridkv.runtime.requests import TokenEvent  # noqa: E402
from hybridkv.scheduler import max_utilization  # noqa: E402

TOL = 1e-4  # max |logit difference| per token, float32 (observed: below 1e-6)
WINDOW = 16  # the families' window / chunk (runtime.model.FAMILIES)


def config(pools: str = "shared", host_bytes: int = 1 << 20, gpu_bytes: int = 1 << 20, **rest: Any) -> EngineConfig:
    return EngineConfig(gpu_bytes=gpu_bytes, host_bytes=host_bytes, max_seq_len=128, tokens_per_block=4,
                        max_batch_size=8, token_budget=64, prefill_chunk_tokens=8, pools=pools, keep_logits=True,
                        **rest)


class HoleCounter:
    """The kernel, counting the calls whose table has a released block the layer's mask skips."""

    def __init__(self) -> None:
        self.calls_with_holes = 0

    def __call__(self, q: Any, k: Any, v: Any, table: Any, *args: Any, **kwargs: Any) -> Any:
        if (kwargs["window"] is not None or kwargs["chunk"] is not None) and bool((table < 0).any()):
            self.calls_with_holes += 1
        return paged_attention(q, k, v, table, *args, **kwargs)


def run_scenario(engine: Engine) -> tuple[list[TokenEvent], dict[str, int]]:
    """Three requests, then a prefix hit on the first, a fork of the second and a suspension
    of the first, each at a moment chosen by what has been generated."""
    rng = np.random.default_rng(0)
    a = engine.add_request(rng.integers(0, 256, 36), 24)
    b = engine.add_request(rng.integers(0, 256, 9), 30)
    engine.add_request(rng.integers(0, 256, 21), 12, temperature=0.8, seed=5)
    events: list[TokenEvent] = []
    done = {"hit": -1, "fork": -1, "suspended": 0}
    while engine.has_work:
        events += engine.step()
        engine.manager.check_invariants()
        out_a, out_b = len(engine.requests[a].outputs), len(engine.requests[b].outputs)
        if out_a >= 1 and done["hit"] < 0:  # a's prompt is published: all 36 of its tokens are reused
            # (a window layer serves a hit at L only from the blocks still live at publish time,
            # those of a's last prefill chunk's window; a state only from its snapshot at 36)
            done["hit"] = engine.add_request(np.concatenate([engine.requests[a].tokens[:36], [1, 2, 3, 4, 5, 6]]), 8)
        if out_b >= 5 and done["fork"] < 0:
            done["fork"] = engine.fork(b, [7, 8], max_new_tokens=6) or -1
        if out_a == 8 and not done["suspended"]:
            done["suspended"] = 1 + engine.suspend(a)
    return events, done


def reference_logits(ref: Any, tokens: np.ndarray, prompt: int) -> Any:
    """Teacher-forced logits of transformers' own attention and cache: row k predicts the
    token at position prompt + k."""
    ids = torch.as_tensor(tokens, dtype=torch.long)[None]
    with torch.no_grad():
        out = ref(input_ids=ids[:, :prompt], use_cache=True)
        rows, cache = [out.logits[0, -1]], out.past_key_values
        for p in range(prompt, ids.shape[1] - 1):
            # positions given: Bamba's forward defaults them to arange(T) whatever the cache
            # holds (generate() passes them), which would rotate every decode token as position 0
            out = ref(input_ids=ids[:, p:p + 1], position_ids=torch.tensor([[p]]), past_key_values=cache,
                      use_cache=True)
            rows.append(out.logits[0, -1])
            cache = out.past_key_values
    return torch.stack(rows)


def modeling_module(family: str) -> str:
    """The transformers module that defines ``family``'s classes."""
    name = family.removesuffix("_text")  # (gemma3_text, qwen3_5_text: the multimodal family's module)
    return f"transformers.models.{name}.modeling_{name}"


def check_against_transformers(family: str, engine: Engine, events: list[TokenEvent], **sizes: Any) -> float:
    rotary.uninstall(engine.model)  # (a CUDA engine compiles the module's function: the reference runs its own)
    ref = build_model(family, seed=0, **sizes)
    worst = 0.0
    for rid, req in engine.requests.items():
        assert req.finished and len(req.outputs) == req.max_new_tokens
        want = reference_logits(ref, req.tokens[:req.known], req.prompt_tokens)
        mine = [e for e in events if e.request_id == rid]
        assert [e.position for e in mine] == list(range(req.prompt_tokens, req.known))
        got = torch.stack([e.logits for e in mine])
        worst = max(worst, float((got - want).abs().max()))
        if req.temperature == 0.0:  # greedy: the same tokens transformers picks
            assert [e.token for e in mine] == want.argmax(dim=-1).tolist()
    return worst


FAMILIES = [("gemma3_text", "shared"), ("gemma3_text", "per-lifecycle"), ("gemma2", "shared"),
            ("gpt_oss", "per-lifecycle"), ("cohere2", "shared"), ("llama4_text", "shared"),
            ("qwen3_next", "shared"), ("qwen3_next", "per-lifecycle"), ("qwen3_5_text", "shared"),
            ("qwen3_5_moe_text", "per-lifecycle"), ("bamba", "shared"),
            ("granitemoehybrid", "shared"), ("nemotron_h", "shared"), ("falcon_h1", "shared"),
            ("zamba2", "shared"), ("jamba", "shared"), ("lfm2", "shared"),
            ("lfm2_moe", "shared"), ("minimax", "shared"), ("minimax", "per-lifecycle"), ("deepseek_v3", "shared")]


MOE = {"gpt_oss", "deepseek_v3", "qwen3_next", "jamba", "minimax"}  # (the scenario's configs of these have experts)
RECURRENT = {"qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "bamba", "granitemoehybrid", "nemotron_h",
             "falcon_h1", "zamba2", "jamba", "lfm2", "lfm2_moe", "minimax"}
GRAPH_FAMILIES = [("gemma3_text", "shared"), ("gemma2", "shared"), ("gpt_oss", "per-lifecycle"),
                  ("llama4_text", "shared"), ("deepseek_v3", "shared"),
                  # recurrent layers once for the batch; padding rows on a spare state slot
                  ("qwen3_next", "shared"), ("qwen3_next", "per-lifecycle"), ("bamba", "shared"),
                  ("falcon_h1", "shared"), ("zamba2", "shared"), ("jamba", "shared"), ("lfm2", "shared"),
                  ("minimax", "shared")]


# overlapped steps: the host packs step k + 1 before reading step k's tokens (a plain step, a
# padded static one, a recurrent model's per-request runs, MLA)
OVERLAP_CASES = [("gemma3_text", "shared", "off"), ("gemma3_text", "shared", "eager"), ("qwen3_next", "shared", "off"),
                 ("deepseek_v3", "shared", "eager")]


@pytest.mark.parametrize(("family", "pools", "graphs", "overlap"), [(f, p, "off", False) for f, p in FAMILIES]
                         + [(f, p, "eager", False) for f, p in GRAPH_FAMILIES]
                         + [(f, p, g, True) for f, p, g in OVERLAP_CASES])
def test_matches_transformers(family: str, pools: str, graphs: str, overlap: bool, monkeypatch: Any) -> None:
    """``graphs="eager"``: decode steps run padded over the static buffers a CUDA graph replays.
    A recurrent layer runs once for a decode step's whole batch (``recurrent._one_token_each``),
    else per request."""
    batched = []
    one_token_each = recurrent._one_token_each
    monkeypatch.setattr(recurrent, "_one_token_each", lambda *a: batched.append(one_token_each(*a)) or batched[-1])
    kernel = HoleCounter()
    engine = Engine(build_model(family, seed=0), config(pools, decode_graphs=graphs, overlap=overlap), kernel=kernel)
    events, done = run_scenario(engine)
    worst = check_against_transformers(family, engine, events)
    assert worst <= TOL, f"{family} ({pools}): max |dlogit| {worst:.3g}"
    assert len(engine.requests) == 5 and done["fork"] == 4 and done["hit"] == 3
    assert engine.scheduler.reused_tokens == 36  # the prefix hit
    assert done["suspended"] == 2 and engine.scheduler.suspensions == 1  # offloaded, then resumed
    assert engine.scheduler.preemptions == 0
    # decoded past the window: released blocks were skipped (the state models and deepseek_v3: no window)
    no_window = RECURRENT | {"deepseek_v3"}
    assert (kernel.calls_with_holes > 0) == (family not in no_window)
    assert engine.manager.rows.n == 0 and not engine.manager.suspended
    # every step that decodes each of its rows (and only those) ran over the static buffers
    assert (engine.graph_steps > 0) == (graphs == "eager")
    # (a graph's static step runs them once for the batch without asking; prefill chunks run
    # per request: not all)
    assert any(batched) == (family in RECURRENT and graphs == "off") and not (batched and all(batched))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["torch", "default"])
@pytest.mark.parametrize(("family", "pools"), [("gemma3_text", "shared"), ("gpt_oss", "per-lifecycle"),
                                               ("llama4_text", "shared"), ("qwen3_next", "shared"),
                                               ("bamba", "shared")])
def test_matches_transformers_with_pages_on_cuda(family: str, pools: str, kernel: str) -> None:
    """The same scenario with the model and the pages on the GPU (the reference on the CPU),
    through the torch reference kernel and the default one (Triton where it runs)."""
    engine = Engine(build_model(family, seed=0).to("cuda"), config(pools, device="cuda"),
                    kernel=paged_attention if kernel == "torch" else None)
    events, _ = run_scenario(engine)
    assert engine.layers[max(engine.layers)].k.is_cuda
    events = [e._replace(logits=e.logits.cpu()) for e in events]
    assert check_against_transformers(family, engine, events) <= TOL
    assert engine.scheduler.reused_tokens == 36 and engine.scheduler.suspensions == 1


def test_mla_pages_hold_one_latent_head() -> None:
    """DeepSeek-V3's pages hold [c_kv ; k_pe] per token and layer (32 + 8 floats, the layout's
    bytes), not per-head keys and values; with q_proj instead of q_a / q_b, RoPE not
    interleaved and no yarn scaling, the absorbed attention still matches transformers."""
    from hybridkv.storage.pages import page_specs

    plain = {"q_lora_rank": None, "rope_interleave": False, "rope_parameters": {"rope_type": "default",
                                                                               "rope_theta": 10000.0}}
    seen: list[TokenEvent] = []
    engine = Engine(build_model("deepseek_v3", seed=2, **plain), config(), on_token=seen.append)
    grouped, elem = engine.manager.grouped, 4  # float32
    per_token: dict[int, int] = {}
    for lg in grouped.layer_groups:
        for spec in page_specs(grouped, lg.id):
            per_token[spec.layer_id] = per_token.get(spec.layer_id, 0) + spec.bytes_per_token
    assert per_token == {i: (32 + 8) * elem for i in range(3)}  # kv_lora_rank + qk_rope_head_dim
    assert [layer.kv_bytes_per_token for layer in engine.manager.grouped.layout.layers] == [(32 + 8) * elem] * 3
    specs = [s for lg in grouped.layer_groups for s in page_specs(grouped, lg.id)]
    assert {s.buffer for s in specs} == {"latent"} and len(specs) == 3  # one latent page per layer
    for pages in engine.layers.values():
        assert pages.k.shape[1:] == (4, 1, 32 + 8) and pages.v is pages.k  # V: the MLA path reads 32 channels
    rng = np.random.default_rng(1)
    engine.generate([rng.integers(0, 256, 19), rng.integers(0, 256, 30)], max_new_tokens=6)
    ref = build_model("deepseek_v3", seed=2, **plain)
    for rid, req in engine.requests.items():
        want = reference_logits(ref, req.tokens[:req.known], req.prompt_tokens)
        got = torch.stack([e.logits for e in seen if e.request_id == rid])
        assert float((got - want).abs().max()) <= TOL
        assert req.outputs == want.argmax(dim=-1).tolist()


def test_suspend_without_host_room_recomputes() -> None:
    """No host tier room: the suspended request's KV is dropped and recomputed from its tokens."""
    engine = Engine(build_model("gemma3_text", seed=0), config(host_bytes=0))
    events, done = run_scenario(engine)
    assert done["suspended"] == 1 and engine.scheduler.preemptions == 1 and engine.scheduler.suspensions == 0
    assert check_against_transformers("gemma3_text", engine, events) <= TOL


def test_layouts_follow_the_configs() -> None:
    gemma3 = model_layout(build_model("gemma3_text"))
    assert [layer.life_cycle.describe() for layer in gemma3.layers] == ["window(16)"] * 3 + ["full"]
    llama4 = model_layout(build_model("llama4_text"))
    assert [layer.life_cycle.chunk_tokens for layer in llama4.layers] == [16, 16, 16, None]
    assert gemma3.layers[0].kv_bytes_per_token == 2 * 2 * 16 * 4  # K and V, 2 heads x 16, float32


def test_streaming_sampling_and_generate() -> None:
    seen: list[TokenEvent] = []
    engine = Engine(build_model("gemma3_text", seed=1), config(), on_token=seen.append)
    outs = engine.generate([[1, 2, 3], list(range(40))], max_new_tokens=5, temperature=0.7, seed=3)
    assert [len(o) for o in outs] == [5, 5] and len(seen) == 10
    assert [e.finished for e in seen if e.request_id == 0] == [False] * 4 + [True]
    again = Engine(build_model("gemma3_text", seed=1), config()).generate(
        [[1, 2, 3], list(range(40))], max_new_tokens=5, temperature=0.7, seed=3)
    assert again == outs  # seeded sampling is reproducible


def test_a_stop_token_ends_a_request_early() -> None:
    prompts = [[1, 2, 3], list(range(40))]
    full = Engine(build_model("gemma3_text", seed=1), config()).generate(prompts, max_new_tokens=8)
    stop = full[1][2]
    engine = Engine(build_model("gemma3_text", seed=1), config())
    outs = engine.generate(prompts, max_new_tokens=8, stop_token_ids=[stop])
    for mine, whole in zip(outs, full, strict=True):
        end = whole.index(stop) + 1 if stop in whole else len(whole)
        assert mine == whole[:end]
    assert len(outs[1]) == full[1].index(stop) + 1 < 8 and engine.manager.rows.n == 0
    engine.manager.check_invariants()


def test_overlapped_steps_stream_the_same_tokens_through_stops_and_preemptions(monkeypatch: Any) -> None:
    """With overlap the host reads step k's tokens after launching step k + 1, so a stop token
    is read one step late: the request computed one more token, which is dropped, and the
    scheduler ends it wherever that step left it. Memory is tight and admission reserves two
    output tokens only, so decodes preempt each other and recompute, their last token maybe
    still on the device. The tokens, their positions and logits are the plain engine's."""
    monkeypatch.setattr(max_utilization, "DECODE_LOOKAHEAD", 2)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 256, n) for n in (30, 7, 19, 44, 12, 25)]

    def run(overlap: bool, stops: list[int]) -> tuple[Engine, list[TokenEvent]]:
        engine = Engine(build_model("gemma3_text", seed=3), config(gpu_bytes=50_000, host_bytes=0, overlap=overlap))
        for k, p in enumerate(prompts):
            engine.add_request(p, 30, temperature=0.9 if k % 3 == 2 else 0.0, seed=k, stop_token_ids=stops)
        events = []
        while engine.has_work:
            events += engine.step()
            engine.manager.check_invariants()
            assert all(r.pending <= (2 if overlap else 0) for r in engine.requests.values())
        return engine, events

    _, whole = run(False, [])
    by_request = [[e.token for e in whole if e.request_id == k] for k in range(len(prompts))]
    stops = [by_request[1][20], by_request[4][25]]
    plain, plain_events = run(False, stops)
    engine, events = run(True, stops)
    assert [r.outputs for r in engine.requests.values()] == [r.outputs for r in plain.requests.values()]
    assert sorted((e.request_id, e.position, e.token, e.finished) for e in events) == sorted(
        (e.request_id, e.position, e.token, e.finished) for e in plain_events)
    mine = {(e.request_id, e.position): e.logits for e in events}
    assert max(float((mine[e.request_id, e.position] - e.logits).abs().max()) for e in plain_events) < 1e-5
    stopped = [r for r in engine.requests.values() if len(r.outputs) < 30]
    assert len(stopped) >= 2 and all(r.outputs[-1] in stops for r in stopped)
    for r in engine.requests.values():  # nothing past a stop token, no placeholder left
        assert r.pending == 0 and r.known == r.prompt_tokens + len(r.outputs)
        assert np.array_equal(r.tokens[r.prompt_tokens:r.known], r.outputs) and not r.tokens[r.known:].any()
    assert engine.scheduler.preemptions > 0 and engine.manager.rows.n == 0
    assert all(t.status.value == "finished" for t in engine.scheduler.requests.values())


@pytest.mark.parametrize("host_bytes", [0, 1 << 20])
def test_a_stop_read_late_ends_a_request_the_scheduler_moved(host_bytes: int) -> None:
    """The step that samples request 1's stop token is in flight when the scheduler takes the
    request off the GPU (as the next ``schedule`` may): without host room its KV is dropped
    and it is re-admitted to recompute, its last token (the stop) still pending on the device
    and filled into its prefill; with room it waits suspended. Either way reading the stop
    ends it there, with the plain engine's tokens."""
    prompts = [[5, 6, 7, 8, 9], list(range(30, 52))]

    def engine(overlap: bool, stops: list[int]) -> Engine:
        eng = Engine(build_model("gemma3_text", seed=3), config(host_bytes=host_bytes, overlap=overlap))
        for p in prompts:
            eng.add_request(p, 12, stop_token_ids=stops)
        return eng

    plain = engine(False, [])
    list(plain.stream())
    stop = plain.requests[1].outputs[4]
    want = plain.requests[1].outputs[:plain.requests[1].outputs.index(stop) + 1]
    eng = engine(True, [stop])
    moved = False
    while eng.has_work:
        eng.step()
        eng.manager.check_invariants()
        req = eng.requests[1]
        if not moved and len(req.outputs) + req.pending == len(want) and req.pending:
            moved = True  # the stop token is sampled, not read
            assert eng.scheduler.suspend(1) == bool(host_bytes)
    assert moved
    assert eng.requests[1].outputs == want and eng.requests[0].outputs == plain.requests[0].outputs[:len(
        eng.requests[0].outputs)]
    assert (eng.scheduler.suspensions, eng.scheduler.preemptions) == ((1, 0) if host_bytes else (0, 1))
    assert eng.scheduler.requests[1].status.value == "finished" and eng.manager.rows.n == 0
    assert not eng.manager.suspended


def test_bad_input_names_the_field() -> None:
    engine = Engine(build_model("gemma3_text"), config())
    with pytest.raises(ConfigError, match=r"prompt_ids must be in 0\.\.255"):
        engine.add_request([5, 300], 4)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        engine.add_request([5], 0)
    with pytest.raises(ConfigError, match="max_seq_len 128"):
        engine.add_request(list(range(100)), 40)
    assert engine.add_request([1, 2], 2) == 1  # a request the scheduler refused keeps its id (0)
    with pytest.raises(UsageError, match="no such request"):
        engine.fork(9)
    with pytest.raises(UsageError, match="must be running"):
        engine.suspend(7)
    with pytest.raises(UsageError, match="hybridkv_step=StepContext"):
        engine.model(input_ids=torch.tensor([[1, 2]]))


def test_the_readme_example_runs() -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "Engine(" in b]
    assert len(blocks) == 1
    scope: dict[str, Any] = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert [len(o) for o in scope["outs"]] == [8, 8] and len(scope["engine"].requests[scope["r"]].outputs) == 4


def test_state_slices_tile_every_buffer() -> None:
    """In a shared arena of 1 KiB pages Qwen3-Next's three states (3 x 3008 B) are cut into 9
    slice groups; each buffer's parts tile it in byte order, some straddling two slices."""
    from hybridkv.runtime.states import state_buffers

    engine = Engine(build_model("qwen3_next"), config())
    states = state_buffers(engine.manager, {0, 1, 2})
    parts = {(i, name): [(p.layer_group, p.start, p.nbytes) for p in b.parts]
             for i, bufs in states.items() for name, b in bufs.items()}
    assert parts[1, "conv"] == [(2, 0, 64), (3, 64, 896)]
    assert parts[2, "ssm"] == [(6, 0, 192), (7, 192, 1024), (8, 1216, 832)]
    assert sum(p[2] for ps in parts.values() for p in ps) == 3 * (960 + 2048)


def test_other_recurrent_layers_are_refused() -> None:
    from hybridkv.runtime.recurrent import install

    class ShortConv(torch.nn.Module):  # a recurrent mixer of neither known kind
        def __init__(self) -> None:
            super().__init__()
            self.layer_idx, self.conv1d = 0, torch.nn.Conv1d(4, 4, 3)

    model = torch.nn.Sequential(ShortConv())
    with pytest.raises(ConfigError, match=r"layer 0 \(ShortConv\): the engine runs gated delta net, Mamba-2, Mamba"):
        install(model, {0: {}})


def test_zamba2_shared_blocks_find_each_layers_pages() -> None:
    """Zamba2's hybrid layers run shared attention modules (``layer_idx`` -1): the engine wraps
    each so the call's layer reaches the attention function; a second engine on the same model
    wraps the original forward, not the first wrapper."""
    from hybridkv.runtime.attention import install_shared

    model = build_model("zamba2", seed=0)
    Engine(model, config())
    shared = [m for m in model.modules() if getattr(m, "layer_idx", None) == -1]
    assert len(shared) == 3 and all(m.forward.args == (m.hybridkv_original_forward,) for m in shared)
    assert install_shared(model) == 3 and all(m.forward.args == (m.hybridkv_original_forward,) for m in shared)


def test_zamba2_with_a_saved_head_dim_runs_on_pages_of_that_size() -> None:
    """transformers keeps a saved ``attention_head_dim`` over its derived 2 x hidden_size /
    heads (here 16 against 32; without the per-layer adapters, which transformers sizes at
    the derived width); the layout reads it too, and the engine matches transformers."""
    sizes = {"head_dim": 16, "use_shared_attention_adapter": False}
    model = build_model("zamba2", seed=0, **sizes)
    engine = Engine(model, config())
    attention = [la for la in engine.plan.spec.layout.layers if la.kv_bytes_per_token]
    assert model.config.attention_head_dim == 16
    assert {la.kv_bytes_per_token for la in attention} == {2 * 4 * 16 * 4}  # K+V, 4 KV heads x 16, float32
    rng = np.random.default_rng(1)
    req = engine.add_request(rng.integers(0, 256, 12), 6)
    events = list(engine.stream())
    assert check_against_transformers("zamba2", engine, events, **sizes) <= TOL
    assert len(engine.requests[req].outputs) == 6


def test_jamba_mixers_get_the_step_through_their_layers() -> None:
    """Jamba's decoder layer calls its Mamba-1 mixer with ``past_key_values`` alone: the engine
    wraps the layer to pass the step there; a second engine on the same model wraps the
    original forwards, not the first wrappers."""
    model = build_model("jamba", seed=0)
    Engine(model, config())
    Engine(model, config())
    mixers = [m for m in model.modules() if type(m).__name__ == "JambaMambaMixer"]
    layers = [m for m in model.modules() if any(c in mixers for c in m.children())]
    assert len(mixers) == 3 and len(layers) == 3
    assert all(m.forward.args[0] is m.hybridkv_original_forward for m in mixers + layers)
    assert {m.hybridkv_state_shape for m in mixers} == {(64, 16)}  # [inner size, d_state]


@pytest.mark.parametrize("model_type", ["lfm2", "lfm2_moe"])
def test_lfm2_short_convs_keep_their_inputs_in_pages(model_type: str) -> None:
    """LFM2's conv layers keep the last ``conv_L_cache - 1`` inputs of B * x in their pages
    (64 channels x 2, float32) and no other state; their decoder layers hand the step over as
    ``past_key_values``, the only cache keyword the convolution gets."""
    from hybridkv.runtime.states import state_buffers

    model = build_model(model_type, seed=0)
    engine = Engine(model, config())
    states = state_buffers(engine.manager, {0, 1, 2})
    assert {i: {name: b.nbytes for name, b in bufs.items()} for i, bufs in states.items()} \
        == {i: {"conv": 64 * 2 * 4} for i in range(3)}
    convs = [m for m in model.modules() if type(m).__name__.endswith("ShortConv")]
    assert len(convs) == 3 and all(m.hybridkv_state_shape is None for m in convs)
    layers = [m for m in model.modules() if any(c in convs for c in m.children())]
    assert len(layers) == 3 and all(m.forward.args[0] is m.hybridkv_original_forward for m in layers)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("family", "pools", "mode"), [
    ("gemma3_text", "shared", "capture"), ("gemma2", "shared", "auto"), ("llama4_text", "shared", "capture"),
    # recurrent layers once for the batch, padding rows on a spare state slot
    ("bamba", "shared", "auto"), ("lfm2", "shared", "capture"), ("qwen3_5_text", "shared", "auto"),
    ("falcon_h1", "shared", "auto"), ("zamba2", "shared", "auto"),
    # transformers' grouped-GEMM experts are not capturable: "auto" runs the same static step
    # eagerly, and says why
    ("gpt_oss", "per-lifecycle", "auto"), ("deepseek_v3", "shared", "auto"), ("qwen3_next", "shared", "auto"),
    ("qwen3_next", "per-lifecycle", "auto"), ("jamba", "shared", "auto"), ("minimax", "shared", "auto")])
def test_decode_graphs_on_cuda(family: str, pools: str, mode: str) -> None:
    """Decode steps replayed from captured CUDA graphs (the default on a GPU with Triton) give
    the logits transformers gives; a step of n rows replays the graph of the next size up."""
    engine = Engine(build_model(family, seed=0).to("cuda"), config(pools, device="cuda", decode_graphs=mode))
    events, _ = run_scenario(engine)
    assert engine.graph_steps > 0 and engine.graphs is not None
    captured = family not in MOE
    assert (engine.graphs.failed is None) == captured, engine.graphs.failed
    assert captured or engine.graphs.failed.startswith("capturing batch 4 failed in ")  # (where, in its code)
    assert bool(engine.graphs.graphs) == captured
    assert engine.norms  # RMSNorms fused where the Triton kernels run (norms.py)
    # the rotary function compiled (on by default on a GPU) where the family has one (Llama 4
    # rotates by complex multiplication in its own function)
    assert engine.rotary == ([] if family == "llama4_text" else [modeling_module(family)])
    events = [e._replace(logits=e.logits.cpu()) for e in events]
    assert check_against_transformers(family, engine, events) <= TOL


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("family", "pools"), [("qwen3_next", "shared"), ("gpt_oss", "per-lifecycle"),
                                               ("deepseek_v3", "shared"), ("jamba", "shared"), ("minimax", "shared")])
def test_moe_decode_graphs_capture_in_bf16(family: str, pools: str) -> None:
    """transformers' experts copy between host and device in float32 only: in bf16 (its
    grouped GEMMs) the MoE families' decode steps capture under "auto", and the replays give
    the tokens and logits of the same static step run eagerly (the CPU tests prove that step
    against transformers)."""
    model = build_model(family, seed=0).to("cuda", torch.bfloat16)
    runs = {}
    for mode in ("auto", "eager"):
        engine = Engine(model, config(pools, device="cuda", decode_graphs=mode))
        runs[mode], _ = run_scenario(engine)
        assert engine.graph_steps > 0 and engine.graphs is not None
        assert engine.graphs.failed is None and bool(engine.graphs.graphs) == (mode == "auto")
    rotary.uninstall(model)
    assert [(e.request_id, e.position, e.token) for e in runs["auto"]] == \
        [(e.request_id, e.position, e.token) for e in runs["eager"]]
    assert max(float((a.logits.float() - b.logits.float()).abs().max())
               for a, b in zip(runs["auto"], runs["eager"], strict=True)) <= 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("family", "pools"), [("gemma3_text", "shared"), ("gpt_oss", "per-lifecycle"),
                                               ("qwen3_next", "shared")])
def test_compiled_rotary_on_cuda(family: str, pools: str) -> None:
    """``compiled_rotary`` (on by default on a GPU): prefill chunks and decode steps (graphs
    captured over the compiled kernels) through torch.compile of the family's own rotary
    function give transformers' logits; the original comes back with ``rotary.uninstall``, and
    an engine with ``compiled_rotary=False`` keeps it."""
    import sys

    model = build_model(family, seed=0).to("cuda")
    original = getattr(sys.modules[modeling_module(family)], rotary.FUNCTION)
    engine = Engine(model, config(pools, device="cuda"))
    try:
        assert engine.rotary == [modeling_module(family)]
        assert getattr(sys.modules[modeling_module(family)], rotary.FUNCTION) is not original
        events, _ = run_scenario(engine)
        assert engine.graph_steps > 0 and engine.graphs is not None
        assert (engine.graphs.failed is None) == (family not in MOE)  # (MoE: the static step runs eagerly)
    finally:
        assert rotary.uninstall(model) == 1  # (the reference runs the module's own function)
    assert getattr(sys.modules[modeling_module(family)], rotary.FUNCTION) is original
    events = [e._replace(logits=e.logits.cpu()) for e in events]
    assert check_against_transformers(family, engine, events) <= TOL
    plain = Engine(model, config(pools, device="cuda", compiled_rotary=False))
    assert plain.rotary == [] and getattr(sys.modules[modeling_module(family)], rotary.FUNCTION) is original


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_graphs_recapture_after_a_reset() -> None:
    """``DecodeGraphs.reset`` drops the graphs and their pool (torch frees a pool with its last
    graph, so capturing into the old one fails): the next decode steps capture again and give
    the same tokens, with and without overlapped steps."""
    engine = Engine(build_model("gemma3_text", seed=0).to("cuda"), config(device="cuda", decode_graphs="capture"))
    prompts = [[1, 2, 3], list(range(40, 60))]
    first = engine.generate(prompts, max_new_tokens=6)
    assert engine.graphs is not None and engine.graphs.graphs
    for overlap in (True, False):
        engine.graphs.reset()
        engine.overlap = overlap
        assert not engine.graphs.graphs and engine.generate(prompts, max_new_tokens=6) == first
        assert engine.graphs.graphs and engine.graphs.failed is None


def test_decode_graph_modes_are_checked() -> None:
    with pytest.raises(ConfigError, match="decode_graphs must be one of auto, capture, eager, off"):
        config(decode_graphs="always")
    hybrid = build_model("qwen3_next", seed=0)
    assert Engine(hybrid, config(decode_graphs="eager")).graphs is not None  # recurrent layers: when asked
    assert Engine(hybrid, config()).graphs is None or torch.cuda.is_available()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA device and the Triton kernels"):
            Engine(build_model("gemma3_text", seed=0), config(decode_graphs="capture"))
    assert Engine(build_model("gemma3_text", seed=0), config()).graphs is None or torch.cuda.is_available()


@pytest.mark.parametrize("overlap", [False, True])
def test_abort_ends_a_request_wherever_it_is(overlap: bool) -> None:
    """A client leaves: ``abort`` ends a waiting, a running and a suspended request; their
    pages are freed, no token of theirs comes out after it (one on the device is dropped),
    and the others' tokens are those of a run without them."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 256, n) for n in (12, 30, 7, 19)]

    def engine() -> Engine:
        eng = Engine(build_model("gemma3_text", seed=2), EngineConfig(**{**config(overlap=overlap).__dict__,
                                                                          "max_batch_size": 2}))
        for p in prompts:
            eng.add_request(p, 10)
        return eng

    whole = engine()
    list(whole.stream())
    eng = engine()
    events: list[TokenEvent] = []
    aborted: dict[int, int] = {}
    while eng.has_work:
        events += eng.step()
        eng.manager.check_invariants()
        status = {i: t.status.value for i, t in eng.scheduler.requests.items()}
        if not aborted and status[3] == "waiting" and len(eng.requests[0].outputs) >= 2:
            assert eng.abort(3)  # waiting: it never runs
            aborted[3] = len(eng.requests[3].outputs)
            assert eng.suspend(1)
            assert eng.abort(1)  # suspended: closed on the host tier
            aborted[1] = len(eng.requests[1].outputs)
        if 0 not in aborted and len(eng.requests[0].outputs) >= 5:
            assert eng.abort(0)  # running, maybe with a token in flight
            aborted[0] = len(eng.requests[0].outputs)
    assert sorted(aborted) == [0, 1, 3] and aborted[3] == 0
    for i, n in aborted.items():
        assert eng.requests[i].outputs == whole.requests[i].outputs[:n]
        assert [e.token for e in events if e.request_id == i] == eng.requests[i].outputs
        assert eng.requests[i].pending == 0 and eng.scheduler.requests[i].status.value == "finished"
    assert eng.requests[2].outputs == whole.requests[2].outputs
    assert not eng.abort(2) and not eng.abort(0)  # finished already
    with pytest.raises(UsageError, match=r"abort\(9\): no such request"):
        eng.abort(9)
    assert eng.manager.rows.n == 0 and not eng.manager.suspended
