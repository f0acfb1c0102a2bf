"""The GPU checks (``-m gpu``, run by ``benchmarks/gpu_check.py``): fused GGeM on CUDA against the
float64 reference (values and gradients, fp32 and bf16 inputs), the image tower under bf16 autocast,
and torch.compile of the image tower. Every test runs on ``cpu`` too (the same body; compile with
``aot_eager`` there, no C++ build), so the logic is exercised on machines without CUDA; the ``cuda``
cases carry the ``gpu`` marker and are skipped without a CUDA device (tests/conftest.py)."""
import pytest
import torch

import mmrl
from helpers.op_dtypes import OpDtypes
from mmrl.layers import ggem, ggem_reference

TINY = "mmrl-vit-tiny-p8-64"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _rounding_bound(ref: torch.Tensor, dtype: torch.dtype, rtol: float, atol: float) -> torch.Tensor:
    """Per element: the error of ``ref`` correctly rounded to ``dtype``, plus fp32 noise."""
    return (ref.to(dtype).double() - ref).abs() + rtol * ref.abs() + atol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups", [1, 12, 96])  # GeM, one exponent per head (ViT-B/16: 12), channel-wise
def test_fused_ggem_matches_float64_reference(device, dtype, groups):
    """Values and gradients (wrt x and p) of the fused kernel at float32 accuracy against the float64
    formula on the same (dtype-rounded) tokens; with bf16 tokens, the fp32 result rounded once to bf16."""
    g = torch.Generator().manual_seed(groups)
    batch, tokens, channels = 5, 49, 96
    x = (torch.randn(batch, tokens, channels, generator=g) * 0.7 + 0.3).to(dtype)  # signed: the clamp matters
    p_init = torch.rand(groups, generator=g) * 5 + 1
    weights = torch.randn(batch, channels, generator=g).to(dtype)  # exact in dtype: the upstream gradient

    xd = x.clone().to(device).requires_grad_()
    pd = p_init.clone().to(device).requires_grad_()
    out = ggem(xd, pd)
    (out * weights.to(device)).float().sum().backward()
    assert out.dtype == dtype and xd.grad.dtype == dtype and pd.grad.dtype == torch.float32

    x64 = x.double().to(device).requires_grad_()
    p64 = p_init.double().to(device).requires_grad_()
    ref = ggem_reference(x64, p64)
    (ref * weights.double().to(device)).sum().backward()

    tol = dict(rtol=1e-4, atol=1e-6)
    assert ((out.double() - ref).abs() <= _rounding_bound(ref.detach(), dtype, **tol)).all()
    assert ((xd.grad.double() - x64.grad).abs() <= _rounding_bound(x64.grad, dtype, **tol)).all()
    # p's gradient sums B x N x C/G terms in fp32: its scale, not each term's, sets the noise
    scale = float(p64.grad.abs().max())
    torch.testing.assert_close(pd.grad.double(), p64.grad, rtol=1e-4, atol=1e-5 * scale)


def _tower(device):
    torch.manual_seed(0)
    model = mmrl.create_model(TINY, pool="ggem").to(device)
    with torch.no_grad():
        model.visual.pooler.p.copy_(torch.linspace(1.5, 6.0, model.visual.pooler.groups))
    return model.visual


def _grads(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in module.parameters() if p.grad is not None])


@pytest.mark.parametrize("device", DEVICES)
def test_tower_under_bf16_autocast_is_close_to_fp32_and_pools_in_fp32(device):
    visual = _tower(device)
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
    w = torch.randn(8, visual.output_dim, generator=torch.Generator().manual_seed(2)).to(device)
    out32 = visual(images)
    (out32 * w).sum().backward()
    grads32 = _grads(visual)
    visual.zero_grad(set_to_none=True)
    mode = OpDtypes()
    with torch.autocast(device, dtype=torch.bfloat16):
        out16 = visual(images)
        with mode:  # the pooler alone, on the tokens the tower gave it
            visual.pooler(torch.randn(2, 64, visual.pooler.dim, device=device, dtype=torch.bfloat16))
    (out16.float() * w).sum().backward()
    grads16 = _grads(visual)
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all() and torch.isfinite(grads16).all()
    # bf16 activations (8 significant bits) through 4 blocks: features within a few percent, same direction
    cos = torch.nn.functional.cosine_similarity(out16.float(), out32, dim=-1)
    assert cos.min() > 0.99, cos
    assert float(torch.nn.functional.cosine_similarity(grads16, grads32, dim=0)) > 0.95
    for op in ("log2", "exp2", "amax", "mean", "addcmul"):
        assert mode.seen.get(op) == {torch.float32}, (op, mode.seen.get(op))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_image_tower_equals_eager(device):
    """torch.compile (inductor on CUDA; aot_eager on CPU: the same captured graphs without a C++ build)
    of the GGeM tower: outputs and every parameter's gradient within float32 reordering noise of eager."""
    visual = _tower(device)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3)).to(device)
    w = torch.randn(4, visual.output_dim, generator=torch.Generator().manual_seed(4)).to(device)

    def run(fn):
        visual.zero_grad(set_to_none=True)
        out = fn(images)
        (out * w).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in visual.named_parameters() if p.grad is not None}

    eager_out, eager_grads = run(visual)
    compiled = torch.compile(visual, backend="inductor" if device == "cuda" else "aot_eager")
    out, grads = run(compiled)
    # CUDA: inductor's fused kernels and attention pick other reduction orders than eager's: 10x CPU's noise
    rtol, rel_atol = (1e-3, 1e-4) if device == "cuda" else (1e-4, 1e-5)
    torch.testing.assert_close(out, eager_out, rtol=rtol, atol=rel_atol * float(eager_out.abs().max()))
    assert grads.keys() == eager_grads.keys() and "pooler.p" in grads
    for name, grad in grads.items():
        scale = float(eager_grads[name].abs().max())
        torch.testing.assert_close(grad, eager_grads[name], rtol=rtol, atol=max(1e-6, rel_atol * scale), msg=name)
