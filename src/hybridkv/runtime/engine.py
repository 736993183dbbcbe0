"""The reference engine: hybridkv's scheduler and manager driving a transformers model.

One step (``Engine.step``):

1. The scheduler picks the step (decodes, prefill chunks, admissions, prefix hits, resumes,
   victims) and the manager hands back the block tables (``StepPlan``).
2. Every running request's new tokens are packed into one sequence (batch 1), with each
   token's position in its request as ``position_ids`` and its batch row in ``q_row``.
3. The model runs once; its attention layers write their keys and values into the pages and
   read them back through the tables (``attention.py``); logits are computed only at the last
   token of each request that finished its prompt (or decodes). A decode step (every row
   computes one token and samples it) replays a CUDA graph instead where one was captured
   (``graphs.py``; on a GPU, where the RMSNorms are fused too, ``norms.py``, and, asked for,
   the rotary function compiled, ``rotary.py``).
4. Those requests sample a token on the device (``sampling.StepSampler``), the scheduler
   records the step (publishes prefixes to the prefix cache, closes finished requests), and
   each new token is streamed once the host has read it.

Overlapped steps (``EngineConfig.overlap``, on by default on a GPU): the host reads a step's
tokens only after launching the next step, so the scheduler, the manager and the packing of
step ``k + 1`` run while the device computes step ``k``. Scheduling needs token counts, not
token values; the one input the next step takes from the step before, each decoding
request's new token, is filled in on the device (``packing.py``). ``step()`` then returns the
tokens of the step before. A stop token is read one step late: the request ran one more token,
which is dropped, and the scheduler ends it wherever that step left it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError, InvariantError, UsageError
from hybridkv.core.types import GPU, MIB, CacheHandle
from hybridkv.engine.triton_attention import paged_attention_triton, pick_paged_attention
from hybridkv.engine.triton_write import pick_write_kv
from hybridkv.manager.manager import KVCacheManager, ManagerConfig
from hybridkv.manager.tiers import StorageConfig
from hybridkv.planning.planner import PlanSpec, plan
from hybridkv.runtime import attention
from hybridkv.runtime.adapt import onto_pages
from hybridkv.runtime.graphs import DecodeGraphs
from hybridkv.runtime.model import model_layout
from hybridkv.runtime.packing import pack, upload
from hybridkv.runtime.requests import GenRequest, TokenEvent
from hybridkv.runtime.sampling import SampledStep, StepSampler
from hybridkv.scheduler.request import SeqRequest, Status
from hybridkv.scheduler.scheduler import Scheduler, SchedulerConfig, StepPlan

GRAPH_MODES = ("auto", "capture", "eager", "off")


@dataclass(frozen=True)
class EngineConfig:
    """Memory, batching and prefill settings of an engine (the plan's and scheduler's fields);
    ``storage`` None: torch pools on ``device`` with a torch host tier."""

    gpu_bytes: int = 16 * MIB
    host_bytes: int = 16 * MIB
    max_seq_len: int | None = None  # None: the model's max_position_embeddings, at most 4096
    tokens_per_block: int = 16
    max_batch_size: int = 8
    pools: str = "shared"
    token_budget: int = 512
    prefill_chunk_tokens: int = 128
    prefix_cache: bool = True
    keep_logits: bool = False
    device: str = "cpu"
    # decode steps from CUDA graphs (runtime/graphs.py): "auto" captures them on a CUDA device
    # with the Triton kernels (a model whose step cannot be captured runs the same static
    # step eagerly, and says why); "capture" insists; "eager" runs the padded static step
    # without capturing (the CPU check); "off" never
    decode_graphs: str = "auto"
    # RMSNorm modules through one Triton kernel each where the kernels run (runtime/norms.py)
    fused_norms: bool = True
    # the model's rotary function through torch.compile on a CUDA device with the Triton
    # kernels (runtime/rotary.py); the first steps of each shape pay the compilation
    compiled_rotary: bool = True
    # q / k / v and gate / up projections each as one GEMM over their stacked weights
    # (runtime/projections.py)
    fused_projections: bool = True
    # schedule and pack the next step while the device runs this one (step() returns the
    # step before's tokens); None: on a CUDA device
    overlap: bool | None = None
    storage: StorageConfig | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.token_budget < self.max_batch_size:
            raise ConfigError(f"token_budget ({self.token_budget}) must be >= max_batch_size ({self.max_batch_size})")
        if self.decode_graphs not in GRAPH_MODES:
            raise ConfigError(f"decode_graphs must be one of {', '.join(GRAPH_MODES)}, got {self.decode_graphs!r}")

    def storage_config(self) -> StorageConfig:
        if self.storage is not None:
            return self.storage
        from hybridkv.storage.torch_backend import TorchCopyEngine

        return StorageConfig.local(gpu_backend="torch", gpu_options={"device": self.device}, host_backend="torch",
                                   copy_engine=TorchCopyEngine())


class Engine:
    """Continuous batching over a transformers causal LM whose KV cache is hybridkv's pages."""

    def __init__(self, model: Any, config: EngineConfig | None = None, *,
                 on_token: Callable[[TokenEvent], None] | None = None,
                 kernel: attention.PagedAttention | None = None) -> None:
        import torch

        self.model, self.config, self.on_token = model, config or EngineConfig(), on_token
        cfg = self.config
        # None: the Triton kernels on a CUDA device (or under TRITON_INTERPRET=1), else the torch reference
        device = torch.device(cfg.device)
        self.kernel = kernel or pick_paged_attention(device)
        self.write = pick_write_kv(device)
        text = getattr(model.config, "text_config", None) or model.config
        self.vocab_size = int(text.vocab_size)
        layout = model_layout(model)
        max_seq_len = cfg.max_seq_len or min(layout.max_position_embeddings or 4096, 4096)
        self.plan = plan(PlanSpec(layout, cfg.gpu_bytes, max_seq_len, cfg.tokens_per_block, cfg.max_batch_size,
                                  cfg.host_bytes, pools=cfg.pools))
        self.manager = KVCacheManager(self.plan, ManagerConfig(storage=cfg.storage_config()))
        if cfg.prefix_cache:
            self.manager.enable_prefix_cache()
        self.scheduler = Scheduler(self.manager, SchedulerConfig(token_budget=cfg.token_budget,
                                                                 prefill_chunk_tokens=cfg.prefill_chunk_tokens))
        on_pages = onto_pages(model, self.manager, device, cfg.fused_norms, cfg.compiled_rotary,
                              cfg.fused_projections)
        self.layers, self.norms, self.rotary = on_pages.layers, on_pages.norms, on_pages.rotary
        self.projections = on_pages.projections  # groups of projections run as one GEMM
        self._needs_runs = on_pages.recurrent  # recurrent layers walk the packed sequence request by request
        self.sampler = StepSampler(cfg.max_batch_size, cfg.device, cfg.keep_logits)
        self.overlap = device.type == "cuda" if cfg.overlap is None else cfg.overlap
        self._in_flight: SampledStep | None = None  # the step whose tokens the host has not read
        self._ready: list[TokenEvent] = []  # tokens read early (drain), returned by the next step()
        self.graphs = self._decode_graphs(device)
        self.graph_steps = 0  # steps replayed from a graph (or, "eager", run over its static buffers)
        self.requests: dict[int, GenRequest] = {}
        self._next_id = 0

    def _decode_graphs(self, device: Any) -> DecodeGraphs | None:
        mode = self.config.decode_graphs
        can_capture = device.type == "cuda" and self.kernel is paged_attention_triton
        strict = mode != "auto"
        if mode == "auto":
            mode = "capture" if can_capture else "off"
        if mode == "off":
            return None
        if mode == "capture" and not can_capture:
            raise ConfigError("decode_graphs='capture' needs a CUDA device and the Triton kernels (pip install "
                              "'hybridkv[triton]'); use 'auto' to capture only where possible")
        families = self.manager.rows.families
        return DecodeGraphs(self.model, self.layers, [f.table for f in families], [f.members for f in families],
                            len(self.manager.grouped.layer_groups), self.config.max_batch_size, self.kernel,
                            pick_write_kv(device, skip_holes=True), self.config.device, self.sampler.last,
                            capture=mode == "capture", strict=strict,
                            state_families={i: self.manager.tiers.allocators[GPU][f.pool_group].num_slots
                                            for i, f in enumerate(families) if not f.life_cycle.per_token})

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, prompt_ids: npt.ArrayLike, max_new_tokens: int, temperature: float = 0.0,
                    seed: int | None = None, stop_token_ids: Sequence[int] = ()) -> int:
        """Queue a request; returns its id. It ends after ``max_new_tokens`` or at a token of
        ``stop_token_ids`` (included in its outputs). One that can never fit raises ConfigError."""
        req = GenRequest.new(self._next_id, prompt_ids, max_new_tokens, temperature, seed, self.vocab_size,
                             frozenset(int(t) for t in stop_token_ids))
        t = self.scheduler.submit(self._spec(req))
        self._next_id += 1  # a refused id stays taken: the scheduler keeps its record
        if t.status is Status.REJECTED:
            raise ConfigError(f"request {req.request_id} can never run: {t.reason} (raise EngineConfig.gpu_bytes "
                              "or max_seq_len, or shorten the request)")
        self.requests[req.request_id] = req
        return req.request_id

    def _spec(self, req: GenRequest) -> SeqRequest:
        return SeqRequest(req.request_id, req.prompt_tokens, req.max_new_tokens, tokens=req.tokens)

    def suspend(self, request_id: int) -> bool:
        """Move a running request's pages to the host tier now (True); the scheduler resumes it
        before newer requests. False: no room below, its KV was dropped and it recomputes."""
        self.drain()
        return self.scheduler.suspend(request_id)

    def abort(self, request_id: int) -> bool:
        """End a request now, whatever it is doing (its client left): waiting, running or
        suspended, its pages are freed and no token of it comes out any more (one sampled by
        the step in flight is dropped). False if it had already finished."""
        req = self.requests.get(request_id)
        if req is None:
            raise UsageError(f"abort({request_id}): no such request (ids 0..{self._next_id - 1})")
        if req.finished:
            return False
        req.finished = True  # (a token still on the device is dropped when read)
        if self.scheduler.requests[request_id].status is not Status.FINISHED:  # (with overlap it may be,
            self.scheduler.finish(request_id, time.monotonic())  # its last token not read yet)
        return True

    def fork(self, request_id: int, extra_ids: Sequence[int] = (), max_new_tokens: int = 1,
             temperature: float = 0.0, seed: int | None = None) -> int | None:
        """A new request continuing running request ``request_id``'s tokens so far plus
        ``extra_ids``, sharing the pages (and recurrent state) of every token it has computed
        (``Scheduler.fork``). None without a free row or pages now."""
        parent = self.requests.get(request_id)
        if parent is None:
            raise UsageError(f"fork({request_id}): no such request (ids 0..{self._next_id - 1})")
        self.drain()  # the parent's tokens, all read
        prompt = np.concatenate([parent.tokens[:parent.known], np.asarray(extra_ids, np.int64)])
        req = GenRequest.new(self._next_id, prompt, max_new_tokens, temperature, seed, self.vocab_size)
        handle = self.scheduler.requests[request_id].handle
        computed = self.manager.lengths(CacheHandle(handle)).capacity if handle is not None else 0
        t = self.scheduler.fork(request_id, self._spec(req), computed)
        if t is None:
            return None
        self._next_id += 1
        if t.status is Status.REJECTED:
            raise ConfigError(f"fork of request {request_id} can never run: {t.reason}")
        self.requests[req.request_id] = req
        return req.request_id

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.num_waiting or self.scheduler.num_running or self._in_flight or self._ready)

    # ---- one step -----------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Run one scheduler step through the model; the new tokens, in batch order (with
        ``overlap``: those of the step before, this one's still on the device)."""
        events, self._ready = self._ready, []
        plan = None
        if self.scheduler.num_waiting or self.scheduler.num_running:
            plan = self.scheduler.schedule()
            if plan.deadlocked:
                raise InvariantError("the scheduler cannot advance any request: the plan's floors are broken")
            if plan.tables is None or not plan.advanced:
                plan = None
        launched = self._launch(plan) if plan is not None else None
        earlier = launched
        if self.overlap:
            earlier, self._in_flight = self._in_flight, launched
        if earlier is not None:
            events += self._deliver(earlier)
        now = time.monotonic()
        if plan is not None:
            self.scheduler.complete(plan, now)
        self._end_stopped(events, now)
        return events

    def drain(self) -> None:
        """Read the step in flight now (its tokens come with the next ``step()``): an
        operation that needs every token's value (fork) or the requests at rest (suspend)."""
        if self._in_flight is not None:
            earlier, self._in_flight = self._in_flight, None
            events = self._deliver(earlier)
            self._end_stopped(events, time.monotonic())
            self._ready += events

    def _launch(self, plan: StepPlan) -> SampledStep | None:
        """Pack the step, run the model (a graph replay for a decode step) and sample on the
        device; nothing here waits for the device."""
        import torch

        families = self.manager.rows.families
        index = self._in_flight.index if self._in_flight is not None else {}
        host = pack(plan, lambda i: self._request_at(plan, i), len(families), self._needs_runs, index)
        if self.graphs is not None and self.graphs.fits(host):
            logits = self.graphs.run(host)  # the model's dtype: greedy rows need no float32 copy
            self.graph_steps += 1
        else:
            dev = upload(host, [f.members for f in families], len(self.manager.grouped.layer_groups),
                         self.config.device, self.sampler.last)
            ctx = attention.StepContext(dev.q_row, dev.q_pos, dev.kv_len, dev.tables, self.layers, host.runs,
                                        self.kernel, self.write, dev.host_tables, host.q_pos)
            with torch.no_grad():
                out = self.model(input_ids=dev.ids[None], position_ids=dev.q_pos[None], use_cache=False,
                                 logits_to_keep=dev.emit_at, **{attention.STEP_KEYWORD: ctx})
            logits = out.logits[0]
        return self.sampler(host, logits) if host.emitting else None

    def _request_at(self, step: StepPlan, i: int) -> GenRequest:
        return self.requests[self.scheduler.by_handle[int(step.handles[i])].spec.request_id]

    def _deliver(self, sampled: SampledStep) -> list[TokenEvent]:
        """A launched step's tokens, read from the device (one transfer), as events."""
        tokens = sampled.read()
        events = []
        for j, req in enumerate(sampled.requests):
            position = req.known - req.pending
            if not req.resolve(tokens[j]):
                continue  # sampled after the request's stop token
            kept = sampled.logits[j] if sampled.logits is not None else None
            events.append(TokenEvent(req.request_id, tokens[j], position, req.finished, kept))
            if self.on_token is not None:
                self.on_token(events[-1])
        return events

    def _end_stopped(self, events: list[TokenEvent], now: float) -> None:
        """End the requests that stopped before max_new_tokens (a stop token): the scheduler
        has not ended them; with overlap, the step after may have suspended or preempted them."""
        for event in events:
            if event.finished:
                t = self.scheduler.requests[event.request_id]
                if t.status in (Status.RUNNING, Status.SUSPENDED, Status.WAITING):
                    self.scheduler.finish(event.request_id, now)

    # ---- running to the end -------------------------------------------------------------
    def stream(self) -> Iterator[TokenEvent]:
        """Step until every request finished, yielding each new token as it comes."""
        while self.has_work:
            yield from self.step()

    def generate(self, prompts: Sequence[npt.ArrayLike], max_new_tokens: int = 16, temperature: float = 0.0,
                 seed: int | None = None, stop_token_ids: Sequence[int] = ()) -> list[list[int]]:
        """Run ``prompts`` together to the end; their output token ids, in order (request k
        samples with ``seed + k``)."""
        ids = [self.add_request(p, max_new_tokens, temperature, None if seed is None else seed + k, stop_token_ids)
               for k, p in enumerate(prompts)]
        for _ in self.stream():
            pass
        return [self.requests[i].outputs for i in ids]
