"""The upper bounds: one message shape, and every config object enforces its own, so a library
user gets the error the console script prints."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_BYTES, MAX_LAYERS, MAX_REQUESTS, MAX_TOKENS, check_max, show
from hybridkv.layouts.catalog import catalog_layout
from hybridkv.layouts.spec import BufferSpec, LayerSpec, ModelLayout, attention_layer, ssm_layer
from hybridkv.lifecycles import Full, Sliding
from hybridkv.planning.demand import Batch
from hybridkv.planning.planner import PlanSpec
from hybridkv.sim.cost import GPUS, CostModel
from hybridkv.sim.workloads import WorkloadSpec

GEMMA = catalog_layout("gemma-3-27b")
LAYER = LayerSpec(Full(), (BufferSpec("kv", 8),))


def test_message_names_the_setting_the_bound_and_the_fix() -> None:
    check_max("--max-seq-len", MAX_TOKENS, MAX_TOKENS, "lower it")  # the bound itself is allowed
    with pytest.raises(ConfigError) as info:
        check_max("--max-seq-len", MAX_TOKENS + 1, MAX_TOKENS, "lower it", " tokens")
    assert str(info.value) == ("--max-seq-len must be <= 1099511627776 tokens (2^40), got 1099511627777 tokens; "
                               "lower it")


def test_show_shortens_what_cannot_be_read() -> None:
    assert show(12345) == "12345"
    assert show(10**4000) == "a 13288-bit number"  # str() would refuse past 4300 digits


@pytest.mark.parametrize(("build", "needle"), [
    (lambda: PlanSpec(GEMMA, MAX_BYTES + 1, 4096), "gpu_bytes (--gpu-mem) must be <= 1152921504606846976"),
    (lambda: PlanSpec(GEMMA, 1 << 30, 4096, host_bytes=MAX_BYTES + 1), "host_bytes (--host-mem) must be <="),
    (lambda: PlanSpec(GEMMA, 1 << 30, MAX_TOKENS + 1), "max_seq_len (--max-seq-len) must be <= 1099511627776"),
    (lambda: PlanSpec(GEMMA, 1 << 30, 4096, tokens_per_block=MAX_TOKENS + 1), "tokens_per_block"),
    (lambda: PlanSpec(GEMMA, 1 << 30, 4096, max_batch_size=MAX_REQUESTS + 1), "max_batch_size (--max-batch-size)"),
    (lambda: PlanSpec(GEMMA, 1 << 30, 4096, constraints=(Batch.uniform("a", MAX_REQUESTS, 8),
                                                          Batch.uniform("b", 1, 8))),
     "requests in all constraints and the typical step"),
    (lambda: Batch.uniform("b", MAX_REQUESTS + 1, 8), "batch 'b': requests must be <= 1048576 (2^20)"),
    (lambda: Batch("b", (MAX_TOKENS + 1,), (0,)), "batch 'b': capacity must be <= 1099511627776"),
    (lambda: Sliding(MAX_TOKENS + 1), "window must be <= 1099511627776 (2^40)"),
    (lambda: BufferSpec("k", MAX_BYTES + 1), "buffer 'k': bytes must be <= 1152921504606846976 (2^60)"),
    (lambda: ModelLayout("m", (LAYER,) * (MAX_LAYERS + 1)), "layout 'm': cache-holding layers must be <= 65536"),
    (lambda: attention_layer(1 << 30, 1 << 30, 2, Full()),
     "attention layer bytes per token (1073741824 KV heads x head_dim 1073741824 x 2 B) must be <="),
    (lambda: ssm_layer(1, 1 << 60, 2, 4), "ssm state bytes (1152921504606846976 state elements x 4 B) must be <="),
    (lambda: WorkloadSpec("chat", 4096, 16, num_requests=MAX_REQUESTS + 1), "--requests must be <= 1048576"),
    (lambda: WorkloadSpec("chat", 4096, 16, seed=-1), "--seed must be in [0, 2^64 - 1]"),
    (lambda: WorkloadSpec("chat", 4096, 16, rate_per_s=float("inf")), "--rate must be > 0 requests/s and finite"),
    (lambda: WorkloadSpec("chat", 4096, 16, rate_per_s=1e-9), "--rate must be in [1e-06, 1e+09]"),
    (lambda: CostModel(GEMMA, GPUS["h100"], float("inf")), "--active-params must be > 0 and <= 1e+15"),
    (lambda: CostModel(GEMMA, GPUS["h100"], float("nan")), "--active-params must be > 0 and <= 1e+15"),
])
def test_config_objects_enforce_the_bounds(build: Callable[[], object], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert needle in str(info.value)


def test_a_width_1_convolution_keeps_no_conv_buffer() -> None:
    layer = ssm_layer(0, 100, 2, 4)
    assert [b.name for b in layer.buffers] == ["ssm"]
