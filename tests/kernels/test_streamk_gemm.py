"""The stream-K GEMM that lost to cuBLAS (`bench.streamk_gemm.streamk_linear`; its numbers are in
docs/performance.md) against an fp64 reference, run on CPU by Triton's interpreter: tiles whose K
steps span two or more groups (finished by the group holding the first steps), whole tiles, ragged
M and N, every epilogue; and the shapes it declines."""
import pytest
import torch
import torch.nn.functional as F

from bench import streamk_gemm as gemm
from bench.streamk_gemm import GemmConfig, streamk_linear

SMALL = GemmConfig(block_m=16, block_n=32, block_k=16, warps=4, stages=2)


def _reference(x, w, b, activation, r):
    y = x.double() @ w.double().t()
    if b is not None:
        y += b.double()
    if activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    elif activation == "relu":
        y = y.relu()
    elif activation == "silu":
        y = F.silu(y)
    return y if r is None else y + r.double()


@pytest.mark.parametrize("m,n,k,programs", [
    (32, 64, 64, 6),      # 2 tile rows x 2 columns of 4 steps over 3 groups of 2: shares of 2 groups
    (48, 64, 128, 15),    # 3 x 2 tiles of 8 steps over 5 groups of 3: most tiles in two shares
    (16, 32, 64, 7),      # one tile over 4 groups of 1 (per = 1 step): four shares, added in order
    (33, 40, 96, 9),      # ragged M and N: 3 x 2 tiles of 6 steps, 3 groups of 3
    (80, 64, 64, 2),      # 5 tile rows, 2 programs: columns of 2 (the third holds one tile), whole tiles
    (64, 96, 32, 8),      # 4 x 3 tiles of 2 steps, 2 groups of 4: 3 columns over 2 groups, shares
])
@pytest.mark.parametrize("epilogue", ["none", "bias_gelu", "bias_residual", "relu_residual"])
def test_matches_reference(m, n, k, programs, epilogue):
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if "bias" in epilogue else None
    r = torch.randn(m, n, generator=g) if "residual" in epilogue else None
    activation = {"bias_gelu": "gelu_tanh", "relu_residual": "relu"}.get(epilogue)
    y = streamk_linear(x, w, b, activation, r, SMALL, programs=programs)
    ref = _reference(x, w, b, activation, r)
    assert y.shape == (m, n) and y.dtype == x.dtype
    assert (y.double() - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    counts, _ = gemm._SCRATCH[x.device]
    assert not counts.any(), "every tile's share count is reset by the program that finished it"


def test_keeps_leading_dimensions_and_reads_strided_rows():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 80, generator=g)[..., :64]             # rows of stride 80
    w = torch.randn(48, 64, generator=g)
    y = streamk_linear(x, w, config=SMALL, programs=3)
    assert y.shape == (2, 5, 48)
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-4)


def test_repeated_calls_agree_bitwise():
    """The shares of a tile are added in program order, whichever program finishes it."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(40, 96, generator=g), torch.randn(64, 96, generator=g)
    first = streamk_linear(x, w, config=SMALL, programs=5)
    assert torch.equal(first, streamk_linear(x, w, config=SMALL, programs=5))


def test_declines_what_it_cannot_run():
    x = torch.randn(4, 40)
    assert streamk_linear(x, torch.randn(8, 40), config=SMALL) is None            # K not a multiple of 16
    assert streamk_linear(x[:, :32], torch.randn(8, 40)[:, :32], config=SMALL) is None   # weight not contiguous


def test_config_from_text():
    assert GemmConfig.parse("128,128,64,4,3") == GemmConfig(128, 128, 64, 4, 3)
