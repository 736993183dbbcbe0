"""The fused RMSNorm kernel against each family's own norm modules (under ``TRITON_INTERPRET=1``
on the CPU, or on a CUDA device): the form ``runtime.norms`` picks for each class, and the
model's logits with every norm fused, against the model's own."""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
torch.set_num_threads(1)

from hybridkv.core.errors import UsageError  # noqa: E402
from hybridkv.engine.triton_attention import triton_available, triton_runs_on  # noqa: E402
from hybridkv.engine.triton_norm import rms_norm_triton  # noqa: E402
from hybridkv.runtime import norms  # noqa: E402
from hybridkv.runtime.model import build_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_runs_on(torch.device(DEVICE)),
                                  reason="needs triton and a CUDA device, or triton with TRITON_INTERPRET=1")

# the form each family's norm classes compute (transformers 5.17)
FORMS = {
    "gemma3_text": {"Gemma3RMSNorm": "offset 1"},
    "gemma2": {"Gemma2RMSNorm": "offset 1"},
    "gpt_oss": {"GptOssRMSNorm": "cast 0"},
    "llama4_text": {"Llama4TextRMSNorm": "cast 0"},
    "deepseek_v3": {"DeepseekV3RMSNorm": "cast 0"},
    "qwen3_next": {"Qwen3NextRMSNorm": "offset 1"},  # (its gated norm is not an RMSNorm class: kept)
}


@needs_triton
@pytest.mark.parametrize("family", sorted(FORMS))
def test_each_norm_class_gets_the_form_it_computes_and_logits_stay(family: str) -> None:
    model = build_model(family, seed=0).to(DEVICE)
    for module in model.modules():  # random norm weights: a form that ignores the weight cannot pass
        if type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None:
            with torch.no_grad():
                module.weight.normal_(0.0, 0.5, generator=torch.Generator(DEVICE).manual_seed(1))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        want = model(ids).logits
        report = norms.install(model)
        got = model(ids).logits
    assert report == FORMS[family]
    assert float((got - want).abs().max()) <= 1e-5
    fused = sum(1 for m in model.modules() if type(m).__name__ in FORMS[family])
    assert fused > 0 and norms.uninstall(model) == fused
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)  # its own forwards again


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_against_float64(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, 40, generator=g) * 4).to(DEVICE, dtype)
    w = (torch.randn(40, generator=g) * 0.5).to(DEVICE, dtype)
    x64, w64 = x.double(), w.double()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for form, offset, want in (("offset", 1.0, y * (1 + w64)), ("cast", 0.0, w64 * y.to(dtype).double())):
        got = rms_norm_triton(x, w, 1e-6, form, offset)
        assert got.dtype == dtype and got.shape == x.shape
        assert float((got.double() - want).abs().max()) <= tol * float(want.abs().max())
    strided = x.transpose(0, 1)  # rows that are not contiguous across the leading dims
    assert torch.equal(rms_norm_triton(strided, w, 1e-6, "offset", 1.0),
                       rms_norm_triton(strided.contiguous(), w, 1e-6, "offset", 1.0))


def test_misuse_is_a_usage_error() -> None:
    x, w = torch.zeros(2, 8), torch.ones(8)
    if not triton_available():
        with pytest.raises(UsageError, match="needs triton"):
            rms_norm_triton(x, w, 1e-6, "offset", 1.0)
        return
    with pytest.raises(UsageError, match="form one of"):
        rms_norm_triton(x, w, 1e-6, "scale", 1.0)
    with pytest.raises(UsageError, match="as long as x's last dim"):
        rms_norm_triton(x, torch.ones(4), 1e-6, "offset", 1.0)


@needs_triton
def test_an_engine_without_fused_norms_gives_the_model_its_own_back() -> None:
    from hybridkv.runtime.engine import Engine, EngineConfig

    model = build_model("gemma3_text", seed=0).to(DEVICE)
    settings = {"gpu_bytes": 1 << 20, "host_bytes": 0, "max_seq_len": 64, "tokens_per_block": 4, "device": DEVICE}
    assert Engine(model, EngineConfig(**settings)).norms == {"Gemma3RMSNorm": "offset 1"}
    norm_modules = [m for m in model.modules() if type(m).__name__ == "Gemma3RMSNorm"]
    assert len(norm_modules) == 4 * 6 + 1  # 4 layers x (4 around the blocks, q and k), the final norm
    assert all(isinstance(m.forward, functools.partial) for m in norm_modules)
    assert Engine(model, EngineConfig(**settings, fused_norms=False)).norms == {}
    assert not any(isinstance(m.forward, functools.partial) for m in norm_modules)
