"""CUDA: the manager on torch CUDA pools with pinned host and disk tiers, pages moved by the
CUDA copy engine; the fake engine writes and verifies tags through the tables on the GPU
after every one of thousands of random operations. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from hybridkv.core.types import TierId  # noqa: E402
from hybridkv.engine.fake import FakeEngine  # noqa: E402
from hybridkv.layouts.spec import ModelLayout, attention_layer, ssm_layer  # noqa: E402
from hybridkv.lifecycles import Chunked, Full, Sliding  # noqa: E402
from hybridkv.manager.manager import KVCacheManager, ManagerConfig  # noqa: E402
from hybridkv.manager.state import RequestState  # noqa: E402
from hybridkv.manager.tiers import StorageConfig  # noqa: E402
from hybridkv.planning.planner import PlanSpec, plan  # noqa: E402


def make_manager(tmp_path, mechanism: str, pools: str = "per-lifecycle") -> KVCacheManager:
    from hybridkv.storage.cuda_copy import CudaCopyEngine

    name, _, ctas = mechanism.partition("-")

    layers = (attention_layer(2, 16, 2, Sliding(24, 4)), attention_layer(2, 16, 2, Full()),
              attention_layer(1, 16, 2, Chunked(40)), ssm_layer(64, 64, 2, 4))
    p = plan(PlanSpec(ModelLayout("cuda-test", layers * 2), 400_000, 256, tokens_per_block=8,
                      max_batch_size=6, host_bytes=300_000, pools=pools))
    storage = StorageConfig.local(gpu_backend="torch", gpu_options={"device": "cuda"}, host_backend="torch",
                            host_options={"device": "cpu", "pin_memory": True}, disk_bytes=300_000,
                            disk_directory=str(tmp_path),
                            copy_engine=CudaCopyEngine(name, max_ctas=int(ctas) if ctas else None))
    return KVCacheManager(p, ManagerConfig(max_active_requests=12, storage=storage))


@pytest.mark.parametrize(("mechanism", "pools"), [
    *((m, "per-lifecycle") for m in ("auto", "batched", "kernel", "kernel-4", "runs", "gather")),
    ("auto", "shared"),  # the arena: every layer group's pages from one CUDA buffer
])
def test_random_operations_keep_data_intact_on_cuda(tmp_path, mechanism: str, pools: str) -> None:
    m = make_manager(tmp_path, mechanism, pools)
    e = FakeEngine(m)
    rng = np.random.default_rng(0)
    handles: list[int] = []
    ops = 0
    for _ in range(1500):
        op = rng.choice(["open", "step", "step", "step", "suspend", "resume", "offload", "close"])
        active = [h for h in handles if m.state(h) is RequestState.ACTIVE]
        suspended = [h for h in handles if m.state(h) is RequestState.SUSPENDED]
        if op == "open":
            h = m.open()
            if h is not None:
                handles.append(h)
        elif op == "step" and active:
            batch = [int(x) for x in rng.choice(active, size=rng.integers(1, len(active) + 1), replace=False)]
            caps = [m.lengths(h).capacity for h in batch]
            new = [min(c + int(rng.choice([1, 1, 1, 9, 30])), m.max_seq_len) for c in caps]
            e.step(batch, new, caps)
        elif op == "suspend" and active:
            m.suspend(int(rng.choice(active)))
        elif op == "resume" and suspended:
            m.resume(int(rng.choice(suspended)))
        elif op == "offload" and suspended:
            m.offload(int(rng.choice(suspended)), TierId(int(rng.integers(1, 3))))
        elif op == "close" and handles:
            h = int(rng.choice(handles))
            if m.state(h) is not RequestState.CLOSED:
                m.close(h)
                e.forget(h)
        m.tiers.copy_engine.synchronize()
        m.check_invariants()
        e.verify()
        ops += 1
    counters = m.stats().counters
    assert ops == 1500 and counters.offloads > 20 and counters.onboards > 10
