"""What the two manager state machines share: the plain model of every cache (state and
lengths), the manager built on a plan at (or just above) its floors with host and disk tiers,
and the rules whose bodies are the same in both (suspend, close)."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from hybridkv.core.types import GPU
from hybridkv.engine.fake import FakeEngine
from hybridkv.layouts.grouping import group_layers
from hybridkv.layouts.spec import LayerSpec, ModelLayout, attention_layer, ssm_layer
from hybridkv.lifecycles import LifeCycle, Ssm
from hybridkv.manager.manager import KVCacheManager, ManagerConfig
from hybridkv.manager.state import CacheLengths, RequestState
from hybridkv.manager.tiers import StorageConfig
from hybridkv.planning.planner import PlanSpec, compute_floors, plan

ACTIVE, SUSPENDED, CLOSED = RequestState.ACTIVE, RequestState.SUSPENDED, RequestState.CLOSED


def make_layer(lc: LifeCycle, width: int) -> LayerSpec:
    """8-byte multiples throughout, as the fake engine needs; ``width`` varies the slot sizes so
    some layer groups share a pool group and some do not. A state (32 or 48 B) is 2 or 3
    times a 16 B attention page, so in shared mode states are often cut into slices."""
    return ssm_layer(8, 8 * (2 * width + 1), 1, 1) if isinstance(lc, Ssm) else attention_layer(width, 8, 1, lc)


class CacheModel:
    """Mixin for a RuleBasedStateMachine: ``build`` makes ``m``, ``fake``, ``state``, ``lengths``."""

    m: KVCacheManager
    fake: FakeEngine
    directory: str
    max_seq_len: int
    state: dict[int, RequestState]
    lengths: dict[int, CacheLengths]

    def build(self, layers: list[LayerSpec], tpb: int, max_seq_len: int, batch: int, gpu_extra: float,
              host: float, disk: float, max_active: int, pools: str = "per-lifecycle", **storage: Any) -> None:
        """A manager over a plan (pool mode ``pools``) whose GPU quota is the floors' bytes times
        ``1 + gpu_extra``; host and disk tiers sized as shares of those bytes (disk files in a
        temp folder)."""
        layout = ModelLayout("random", tuple(layers))
        probe = PlanSpec(layout, 1, max_seq_len, tokens_per_block=tpb, max_batch_size=batch, pools=pools)
        grouped = group_layers(layout, tpb, pools)
        need = sum(f.min_slots * pg.slot_bytes
                   for f, pg in zip(compute_floors(probe, grouped), grouped.pool_groups, strict=True))
        p = plan(PlanSpec(layout, max(1, int(need * (1 + gpu_extra))), max_seq_len, tokens_per_block=tpb,
                          max_batch_size=batch, host_bytes=int(need * host), pools=pools))
        self.directory = tempfile.mkdtemp(prefix="hybridkv-test-")
        config = StorageConfig.local(disk_bytes=int(need * disk), disk_directory=self.directory, **storage)
        self.m = KVCacheManager(p, ManagerConfig(max_active_requests=max_active, storage=config))
        self.fake = FakeEngine(self.m)
        self.max_seq_len = max_seq_len
        self.state, self.lengths = {}, {}

    def teardown(self) -> None:
        if hasattr(self, "m"):
            self.m.close_storage()
            assert os.listdir(self.directory) == []  # every disk pool file went with its buffer
            shutil.rmtree(self.directory)

    def handles(self, *states: RequestState) -> list[int]:
        return sorted(h for h, s in self.state.items() if s in states)

    @precondition(lambda self: self.handles(ACTIVE))
    @rule(data=st.data())
    def suspend(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from(self.handles(ACTIVE)), label="handle")
        in_use = [a.num_in_use for a in self.m.tiers.allocators[GPU]]
        self.m.suspend(h)
        assert self.m.suspended[h].tier == GPU
        assert [a.num_in_use for a in self.m.tiers.allocators[GPU]] == in_use  # pages stay put
        self.state[h] = SUSPENDED

    @precondition(lambda self: self.handles(ACTIVE, SUSPENDED))
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from(self.handles(ACTIVE, SUSPENDED)), label="handle")
        self.m.close(h)
        self.fake.forget(h)
        self.state[h] = CLOSED
        del self.lengths[h]
