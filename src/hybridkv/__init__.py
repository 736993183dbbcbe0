"""hybridkv: a KV-cache manager for inference engines serving hybrid-attention models.

Start with ``plan(PlanSpec(load_model("gemma-3-27b"), gpu_bytes=40 * GIB, max_seq_len=32768))``, then
``KVCacheManager(plan)`` and ``Scheduler(manager)``;
docs/ARCHITECTURE.md walks through the layers bottom-up.
"""

from hybridkv.core.errors import CapacityError, ConfigError, HybridKVError, InvariantError, UsageError
from hybridkv.core.types import GIB, GPU, KIB, MIB, TierId
from hybridkv.layouts.grouping import GroupedLayout, LayerGroup, PoolGroup, group_layers
from hybridkv.layouts.models import load_model
from hybridkv.layouts.spec import BufferSpec, LayerSpec, ModelLayout
from hybridkv.lifecycles import (
    Chunked,
    Encoder,
    Full,
    LifeCycle,
    Sliding,
    Ssm,
    live_blocks,
    register_layer_type,
    stale_range,
    worst_decode_blocks,
)
from hybridkv.manager.manager import KVCacheManager, ManagerConfig, StepResult
from hybridkv.manager.prefix import PrefixCache, PrefixHit
from hybridkv.manager.state import CacheLengths, RequestState
from hybridkv.manager.step_tables import StepTables
from hybridkv.manager.tiers import StorageConfig, TierSpec
from hybridkv.planning.demand import Batch, batch_demand, concurrent_decode_demand, demand, worst_request_demand
from hybridkv.planning.planner import PlanSpec, PoolGroupPlan, PoolPlan, plan
from hybridkv.planning.report import ideal_concurrency, max_concurrency, max_seq_len_at, plan_json
from hybridkv.reuse import EventQueue, ReuseScope
from hybridkv.scheduler.request import SeqRequest, Status, Tracked
from hybridkv.scheduler.scheduler import Scheduler, SchedulerConfig, StepPlan
from hybridkv.storage.backends import register_backend

__all__ = [
    "GIB",
    "GPU",
    "KIB",
    "MIB",
    "Batch",
    "BufferSpec",
    "CacheLengths",
    "CapacityError",
    "Chunked",
    "ConfigError",
    "Encoder",
    "EventQueue",
    "Full",
    "GroupedLayout",
    "HybridKVError",
    "InvariantError",
    "KVCacheManager",
    "LayerGroup",
    "LayerSpec",
    "LifeCycle",
    "ManagerConfig",
    "ModelLayout",
    "PlanSpec",
    "PoolGroup",
    "PoolGroupPlan",
    "PoolPlan",
    "PrefixCache",
    "PrefixHit",
    "RequestState",
    "ReuseScope",
    "Scheduler",
    "SchedulerConfig",
    "SeqRequest",
    "Sliding",
    "Ssm",
    "Status",
    "StepPlan",
    "StepResult",
    "StepTables",
    "StorageConfig",
    "TierId",
    "TierSpec",
    "Tracked",
    "UsageError",
    "batch_demand",
    "concurrent_decode_demand",
    "demand",
    "group_layers",
    "ideal_concurrency",
    "live_blocks",
    "load_model",
    "max_concurrency",
    "max_seq_len_at",
    "plan",
    "plan_json",
    "register_backend",
    "register_layer_type",
    "stale_range",
    "worst_decode_blocks",
    "worst_request_demand",
]
