"""Seeded exponential noise (kernels/sampling.py): the Triton kernel (TRITON_INTERPRET=1 on CPU) gives
the torch reference's values; the values are Exp(1); rows of different keys are unrelated; the host's
draw keys are 32-bit and distinct across seeds and token indices."""
import math

import pytest
import torch

from kernels import sampling
from kernels.sampling import draw_key, seeded_exponential, seeded_exponential_torch


@pytest.mark.parametrize("n", [1, 1000, 2500])
def test_kernel_equals_the_reference(n, monkeypatch):
    monkeypatch.setattr(sampling, "use_triton", lambda x: True)
    keys = torch.tensor([0, 1, 2**32 - 1, draw_key(7, 0), draw_key(7, 1)], dtype=torch.int64)
    got = seeded_exponential(keys, n)
    torch.testing.assert_close(got, seeded_exponential_torch(keys, n), rtol=1e-6, atol=0)
    assert got.shape == (5, n) and got.dtype == torch.float32


def test_noise_is_exp1_and_rows_are_unrelated():
    n = 200_000
    noise = seeded_exponential_torch(torch.tensor([draw_key(3, 0), draw_key(3, 1), draw_key(4, 0)]), n)
    assert bool((noise > 0).all()) and bool(torch.isfinite(noise).all())
    for row in noise:                                   # mean 1, variance 1, P(E > 1) = 1/e
        assert abs(row.mean().item() - 1) < 0.01
        assert abs(row.var().item() - 1) < 0.03
        assert abs((row > 1).double().mean().item() - math.exp(-1)) < 0.005
    corr = torch.corrcoef(noise)
    assert (corr - torch.eye(3)).abs().max().item() < 0.01
    assert (noise[:, 1:] - noise[:, :-1]).abs().mean().item() > 0.9     # neighbours unrelated too


def test_same_key_same_noise_on_any_width():
    keys = torch.tensor([draw_key(11, 5)])
    assert torch.equal(seeded_exponential_torch(keys, 300)[:, :100], seeded_exponential_torch(keys, 100))


def test_draw_keys_are_32_bit_and_distinct():
    keys = {draw_key(seed, index) for seed in (0, 1, 2, 2**63, 2**64 - 1) for index in range(2000)}
    assert len(keys) == 5 * 2000
    assert all(0 <= k < 2**32 for k in keys)
    assert draw_key(5, 9) == draw_key(5, 9)
