"""A norm run inside the product after it (`_Linear._norm_folded`, the CUDA-core kernel's NORM), on CPU
through Triton's interpreter with the dispatch and the tuner's choice forced: the same result as the
norm's own kernel then the product, for LayerNorm and RMSNorm, float and int8 weights; a changed norm
parameter is folded anew; a tile that cannot run a norm runs it first."""
import dataclasses

import pytest
import torch

from kernels import linear
from kernels.block import Norm
from kernels.gemv import Tile, skinny_linear
from kernels.linear import ColumnParallelLinear, TensorParallel
from kernels.quant import QuantSpec
from kernels.spec import ModelSpec

SPEC = ModelSpec(vocab_size=64, hidden_size=96, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=48,
                 intermediate_size=160, max_positions=32, norm="layer", norm_eps=1e-5, activation="gelu_new",
                 gated_mlp=False, positional="learned", attn_scales=(1.0,), attn_windows=(None,))


def _layer(bits: int, g: torch.Generator) -> ColumnParallelLinear:
    quant = None if bits == 16 else QuantSpec(bits=8, group_size=32)
    layer = ColumnParallelLinear(96, 160, True, TensorParallel(), torch.float32, quant)
    w = torch.randn(160, 96, generator=g) * 0.1
    if quant is None:
        layer.weight.data.copy_(w)
    else:
        layer.load_float_weight(w)
    layer.bias.data.copy_(torch.randn(160, generator=g))
    return layer


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_folded_norm_matches_the_norm_then_the_product(bits, kind, monkeypatch):
    monkeypatch.setattr(linear, "use_triton", lambda x: True)
    chosen = {"tile": Tile(1, 8, 32, fma=True, prefetch=True)}
    monkeypatch.setattr(linear, "tuned_tile", lambda *args: chosen["tile"])
    monkeypatch.setattr(linear, "streamed_linear", lambda x, w, b, s, bits, group, act, res, torch_path:
                        skinny_linear(x, w, b, s, bits, group, chosen["tile"], act, res))
    g = torch.Generator().manual_seed(bits)
    layer = _layer(bits, g)
    norm = Norm(dataclasses.replace(SPEC, norm=kind), torch.float32)
    norm.weight.data.copy_(torch.rand(96, generator=g) + 0.5)
    if norm.bias is not None:
        norm.bias.data.copy_(torch.randn(96, generator=g))
    x = torch.randn(1, 96, generator=g) * 2 + 1
    residual = torch.randn(1, 160, generator=g)

    def separate():
        return layer._torch_matmul(norm(x), layer.bias, "gelu_tanh", residual)

    folded = layer._matmul(x, layer.bias, "gelu_tanh", residual, norm=norm)
    torch.testing.assert_close(folded, separate(), rtol=1e-5, atol=1e-5)
    assert len(layer._folds) == 1
    with torch.no_grad():
        norm.weight.mul_(1.5)                                    # a new fold, not the cached one
    torch.testing.assert_close(layer._matmul(x, layer.bias, "gelu_tanh", residual, norm=norm), separate(),
                               rtol=1e-5, atol=1e-5)
    chosen["tile"] = Tile(1, 8, 32, split_k=2, fma=True)         # cannot run a norm: it runs first
    layer._folds.clear()
    torch.testing.assert_close(layer._matmul(x, layer.bias, "gelu_tanh", residual, norm=norm), separate(),
                               rtol=1e-5, atol=1e-5)
    assert not layer._folds
