"""Triton LayerNorm / RMSNorm against their torch references, and the CPU dispatch rule."""
import pytest
import torch

from kernels import norm
from kernels.dispatch import use_triton

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _inputs(dtype, shape=(2, 3, 100)):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    b = torch.randn(shape[-1], generator=g).to(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_triton_matches_torch(dtype, with_bias):
    x, w, b = _inputs(dtype)
    b = b if with_bias else None
    out = norm.layer_norm_triton(x, w, b, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, norm.layer_norm_torch(x, w, b, 1e-5), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_triton_matches_torch(dtype):
    x, w, _ = _inputs(dtype)
    out = norm.rms_norm_triton(x, w, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, norm.rms_norm_torch(x, w, 1e-6), **TOL[dtype])


def test_rms_norm_casts_before_scaling():
    x, _, _ = _inputs(torch.float16, (4, 64))
    w = torch.randn(64, generator=torch.Generator().manual_seed(1))       # fp32 weight, fp16 x
    ref = norm.rms_norm_torch(x, w, 1e-6)
    out = norm.rms_norm_triton(x, w, 1e-6)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_norms_on_row_strided_input():
    wide, w, b = _inputs(torch.float32, (6, 128))
    x, w, b = wide[:, :100], w[:100].contiguous(), b[:100].contiguous()  # rows 128 apart
    torch.testing.assert_close(norm.layer_norm_triton(x, w, b, 1e-5), norm.layer_norm_torch(x, w, b, 1e-5),
                               **TOL[torch.float32])
    torch.testing.assert_close(norm.rms_norm_triton(x, w, 1e-5), norm.rms_norm_torch(x, w, 1e-5),
                               **TOL[torch.float32])


def test_launcher_rejects_wrong_weight_shape():
    x, w, _ = _inputs(torch.float32)
    with pytest.raises(AssertionError, match="parameter shape"):
        norm.rms_norm_triton(x, w[:50], 1e-6)


def test_dispatch_uses_torch_on_cpu(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("Triton path taken for a CPU tensor")
    monkeypatch.setattr(norm, "layer_norm_triton", fail)
    monkeypatch.setattr(norm, "rms_norm_triton", fail)
    x, w, b = _inputs(torch.float32)
    assert not use_triton(x)
    assert torch.equal(norm.layer_norm(x, w, b, 1e-5), norm.layer_norm_torch(x, w, b, 1e-5))
    assert torch.equal(norm.rms_norm(x, w, 1e-5), norm.rms_norm_torch(x, w, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_with_residual_returns_the_sum_and_its_norm(dtype, kind):
    """norm(x, residual=r) == (norm(x + r), x + r), the sum rounded to x's dtype as a separate add;
    the Triton kernel against the reference, and the reference against the two-step form."""
    x, w, b = _inputs(dtype)
    r = _inputs(dtype, (2, 3, 100))[0].flip(0)
    if kind == "layer":
        ref_out, ref_sum = norm.layer_norm_torch(x, w, b, 1e-5, residual=r)
        out, summed = norm.layer_norm_triton(x, w, b, 1e-5, residual=r)
        two_step = norm.layer_norm_torch(x + r, w, b, 1e-5)
    else:
        ref_out, ref_sum = norm.rms_norm_torch(x, w, 1e-6, residual=r)
        out, summed = norm.rms_norm_triton(x, w, 1e-6, residual=r)
        two_step = norm.rms_norm_torch(x + r, w, 1e-6)
    assert torch.equal(ref_sum, x + r) and torch.equal(ref_out, two_step)
    assert torch.equal(summed, x + r)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])


def test_residual_must_match_x():
    x, w, b = _inputs(torch.float32)
    with pytest.raises(AssertionError, match="residual"):
        norm.layer_norm_triton(x, w, b, 1e-5, residual=x[..., :50])
