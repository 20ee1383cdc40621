"""Triton rotary embedding against the torch reference, and the CPU dispatch rule."""
import pytest
import torch

from kernels import rotary
from kernels.dispatch import use_triton

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}
HEAD_DIM = 32


def _inputs(dtype, rotary_dim, tokens=6, heads=4, kv_heads=2, max_positions=64):
    g = torch.Generator().manual_seed(0)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    cos_sin = rotary.rotary_cos_sin(inv_freq, max_positions)                # [positions, rotary_dim]
    qkv = torch.randn(tokens, heads + 2 * kv_heads, HEAD_DIM, generator=g).to(dtype)
    q, k = qkv[:, :heads], qkv[:, heads:heads + kv_heads]                    # strided views of a fused qkv
    positions = torch.randint(0, max_positions, (tokens,), generator=g, dtype=torch.int32)
    return q, k, positions, cos_sin


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype,rotary_dim", [(torch.float32, HEAD_DIM), (torch.float32, 16), (torch.float16, 16)])
def test_rotary_triton_matches_torch(dtype, rotary_dim, interleaved):
    q, k, positions, cos_sin = _inputs(dtype, rotary_dim)
    q_out, k_out = rotary.apply_rotary_triton(q, k, positions, cos_sin, interleaved)
    q_ref, k_ref = rotary.apply_rotary_torch(q, k, positions, cos_sin, interleaved)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == dtype
    torch.testing.assert_close(q_out, q_ref, **TOL[dtype])
    torch.testing.assert_close(k_out, k_ref, **TOL[dtype])
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])


def test_rotary_at_position_zero_is_identity():
    q, k, _, cos_sin = _inputs(torch.float32, 16)
    positions = torch.zeros(q.shape[0], dtype=torch.int64)
    q_out, k_out = rotary.apply_rotary_triton(q, k, positions, cos_sin)
    assert torch.equal(q_out, q) and torch.equal(k_out, k)


def test_launcher_rejects_odd_rotary_dim():
    q, k, positions, cos_sin = _inputs(torch.float32, 16)
    with pytest.raises(AssertionError, match="rotary_dim"):
        rotary.apply_rotary_triton(q, k, positions, cos_sin[:, :15])


def test_dispatch_uses_torch_on_cpu(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("Triton path taken for a CPU tensor")
    monkeypatch.setattr(rotary, "apply_rotary_triton", fail)
    q, k, positions, cos_sin = _inputs(torch.float32, 16)
    assert not use_triton(q)
    out = rotary.apply_rotary(q, k, positions, cos_sin)
    ref = rotary.apply_rotary_torch(q, k, positions, cos_sin)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
