"""GGeM maths: identities, fused vs reference, gradients, precision, stability, registry."""
import pytest
import torch

from mmrl.pooling import ChannelGeM, GeM, GGeM, build_pool, clamp_p, ggem, ggem_reference, list_pools

IMPLS = {"fused": ggem, "reference": ggem_reference}


def positive_tokens(b=3, n=10, c=12, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, c, generator=g, dtype=dtype) * 2 + 0.05


def signed_tokens(b=3, n=10, c=12, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=g, dtype=dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("groups", [1, 3, 12])
def test_p_one_is_average_pooling(impl, groups):
    x = positive_tokens()
    out = IMPLS[impl](x, torch.ones(groups, dtype=x.dtype))
    torch.testing.assert_close(out, x.mean(dim=1))


@pytest.mark.parametrize("impl", IMPLS)
def test_one_group_is_gem(impl):
    x, p = signed_tokens(), 2.5
    gem = x.clamp(min=1e-6).pow(p).mean(dim=1).pow(1 / p)
    torch.testing.assert_close(IMPLS[impl](x, torch.tensor([p], dtype=x.dtype)), gem)


@pytest.mark.parametrize("impl", IMPLS)
def test_groups_equal_channels_is_channelwise_gem(impl):
    x = signed_tokens(c=6)
    p = torch.tensor([1.0, 1.5, 2.0, 3.0, 4.5, 6.0], dtype=x.dtype)
    expected = torch.stack(
        [x[:, :, c].clamp(min=1e-6).pow(p[c]).mean(dim=1).pow(1 / p[c]) for c in range(6)], dim=1
    )
    torch.testing.assert_close(IMPLS[impl](x, p), expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_exponents_apply_to_contiguous_channel_blocks(impl):
    x = signed_tokens(c=8)
    p = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=x.dtype)  # groups of 2 channels: [0,1], [2,3], ...
    out = IMPLS[impl](x, p)
    for g in range(4):
        block = x[:, :, 2 * g: 2 * g + 2]
        torch.testing.assert_close(out[:, 2 * g: 2 * g + 2], IMPLS[impl](block, p[g: g + 1]))
    # interleaved assignment (channel c -> group c % G) would give a different answer
    interleaved = torch.stack([IMPLS[impl](x[:, :, c: c + 1], p[c % 4: c % 4 + 1])[:, 0] for c in range(8)], 1)
    assert not torch.allclose(out, interleaved)


def test_large_p_approaches_max_on_positive_inputs():
    x = positive_tokens(n=16) * 5  # values up to ~10: x ** 200 overflows the naive formula
    out = ggem(x.float(), torch.full((3,), 200.0))
    mx = x.float().amax(dim=1)
    assert torch.isfinite(out).all()
    assert torch.all(out <= mx * (1 + 1e-5))
    assert torch.all(out >= mx * 16 ** (-1 / 200) * (1 - 1e-5))  # power mean >= max * N^(-1/p)
    naive = ggem_reference(x.float(), torch.full((3,), 200.0))
    assert not torch.isfinite(naive).all()  # why the fused path rescales by the max


def test_fused_stable_when_every_token_is_clamped():
    x = -torch.rand(2, 7, 4, dtype=torch.float32) - 0.1  # all negative -> all clamped to eps
    x.requires_grad_(True)
    p = torch.full((2,), 20.0, requires_grad=True)  # eps ** 20 underflows float32
    out = ggem(x, p, eps=1e-6)
    torch.testing.assert_close(out, torch.full_like(out, 1e-6))
    out.sum().backward()
    assert torch.isfinite(p.grad).all() and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("groups", [1, 4, 12])
def test_fused_matches_reference_values_and_gradients(groups):
    x = signed_tokens(b=4, n=9, c=12, seed=1).requires_grad_(True)
    p = (torch.rand(groups, dtype=torch.float64) * 4 + 1).requires_grad_(True)
    grad_out = torch.randn(4, 12, dtype=torch.float64)
    out_f = ggem(x, p)
    gx_f, gp_f = torch.autograd.grad(out_f, (x, p), grad_out)
    out_r = ggem_reference(x, p)
    gx_r, gp_r = torch.autograd.grad(out_r, (x, p), grad_out)
    torch.testing.assert_close(out_f, out_r)
    torch.testing.assert_close(gx_f, gx_r)
    torch.testing.assert_close(gp_f, gp_r)


@pytest.mark.parametrize("groups", [1, 3, 6])
def test_fused_gradcheck_float64(groups):
    g = torch.Generator().manual_seed(groups)
    # signed inputs kept away from the clamp kink at eps (finite differences straddle it otherwise)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    x = torch.where(x.abs() < 0.05, x.sign() * 0.05 + x, x).requires_grad_(True)
    p = (torch.rand(groups, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ggem(a, b, 1e-3), (x, p), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda a, b: ggem_reference(a, b, 1e-3), (x, p), eps=1e-6, atol=1e-6)


def test_fused_slices_batch_on_cpu(monkeypatch):
    import mmrl.layers.generalized_mean as mod

    x = signed_tokens(b=7, n=5, c=4).requires_grad_(True)
    p = torch.tensor([2.0, 3.5], dtype=x.dtype, requires_grad=True)
    whole = torch.autograd.grad(ggem(x, p).sum(), (x, p))
    monkeypatch.setattr(mod, "_CPU_SLICE_ELEMENTS", 2 * 5 * 4)  # 2 images a slice, last slice short
    sliced = torch.autograd.grad(ggem(x, p).sum(), (x, p))
    for a, b in zip(whole, sliced):
        torch.testing.assert_close(a, b)


def test_no_grad_path_matches():
    x = signed_tokens().float()
    p = torch.tensor([2.0, 3.0, 4.0])
    with torch.no_grad():
        a = ggem(x, p)
    b = ggem(x.requires_grad_(True), p)
    torch.testing.assert_close(a, b.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_computes_in_fp32(dtype):
    x = signed_tokens(b=2, n=16, c=12, dtype=torch.float32) * 30  # x ** 3 ~ 1e4..1e6: overflows fp16
    pool = GGeM(12, groups=3)
    ref = pool(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pool(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    naive_lowp = x.to(dtype).clamp(min=1e-6).pow(3).mean(dim=1)
    if dtype == torch.float16:
        assert not torch.isfinite(naive_lowp).all()


def test_bad_groups_rejected():
    with pytest.raises(ValueError, match="groups=5"):
        GGeM(12, groups=5)
    with pytest.raises(ValueError, match="does not divide"):
        ggem(torch.rand(2, 3, 10), torch.ones(3))
    with pytest.raises(ValueError, match="groups"):
        build_pool("ggem", dim=10, heads=3)


def test_module_parameter_and_aliases():
    pool = GGeM(12, groups=4, p_init=2.0)
    assert isinstance(pool.p, torch.nn.Parameter) and pool.p.shape == (4,) and pool.p.requires_grad
    assert torch.equal(pool.p, torch.full((4,), 2.0))
    assert GeM(12).p.shape == (1,) and ChannelGeM(12).p.shape == (12,)
    frozen = GGeM(12, groups=4, learn_p=False)
    assert not frozen.p.requires_grad and "p" in dict(frozen.named_parameters())
    x = positive_tokens(c=12).float()
    torch.testing.assert_close(GGeM(12, 4, fused=False)(x), GGeM(12, 4)(x))


def test_p_is_kept_at_least_one():
    pool = GGeM(6, groups=2)
    with torch.no_grad():
        pool.p.copy_(torch.tensor([0.3, 2.0]))
    x = positive_tokens(c=6).float()
    out = pool(x)
    torch.testing.assert_close(out[:, :3], x[:, :, :3].mean(dim=1))  # p=0.3 acts as p=1
    # the projected gradient: blocked when it would push p further below the bound,
    # passed when a descent step moves p back up
    p = torch.tensor([0.5, 0.5, 2.0], requires_grad=True)
    clamp_p(p, 1.0).backward(torch.tensor([1.0, -1.0, 1.0]))
    assert torch.equal(p.grad, torch.tensor([0.0, -1.0, 1.0]))


@pytest.mark.parametrize("kind", list_pools())
def test_every_registry_kind_builds_and_pools(kind):
    dim, heads = 16, 4
    pool = build_pool(kind, dim, heads)
    tokens = torch.randn(2, 1 + 9, dim)
    out = pool(tokens if pool.uses_class_token else tokens[:, 1:])
    assert out.shape == (2, dim) and torch.isfinite(out).all()


def test_registry_kinds_and_defaults():
    assert set(list_pools()) >= {"tok", "avg", "max", "gem", "ggem", "cgem", "attn"}
    assert build_pool("ggem", 16, 4).groups == 4  # default: one group per attention head
    assert build_pool("ggem", 16, 4, groups=2).groups == 2
    assert build_pool("gem", 16, 4).groups == 1 and build_pool("cgem", 16, 4).groups == 16
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(build_pool("avg", 16, 4)(x), x.mean(1))
    torch.testing.assert_close(build_pool("max", 16, 4)(x), x.amax(1))
    with pytest.raises(ValueError, match="unknown pool kind"):
        build_pool("median", 16, 4)
    with pytest.raises(ValueError, match="takes no options"):
        build_pool("avg", 16, 4, p_init=3)
