"""Pieces of the generic decoder block that have an HF counterpart to agree with."""
import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from kernels.block import alibi_slopes


@pytest.mark.parametrize("num_heads", [1, 2, 4, 6, 8, 12, 16, 24, 30, 32, 112])
def test_alibi_slopes_match_hf_bloom(num_heads):
    """Non-power-of-two head counts take every other slope of the next power of two (BLOOM-176B: 112)."""
    hf = build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)[:, 0, 1]   # each head's slope x position 1
    torch.testing.assert_close(alibi_slopes(num_heads), hf, rtol=1e-6, atol=0)


@pytest.mark.parametrize("family,quant", [("gpt_neo", None), ("gptj", 8), ("llama", 4)])
def test_blocks_fold_their_norms_into_the_products(monkeypatch, family, quant):
    """With QKV and MLP up in the weight-streaming kernels on rows tiles (as decode runs them on a GPU;
    here Triton's interpreter on CPU), pre-norm blocks run without norm kernels: those products take
    the stream and do the norm (LayerNorm with its bias, RMSNorm; sequential and parallel residual;
    float, int8 and int4 weights), the output projection and MLP down add the residual. Logits as
    with the norm kernels. One layer, one token: the interpreter is slow."""
    import kernels.gemv_tuner as tuner
    import kernels.linear as linear
    import rayspeed
    from kernels.block import DecoderBlock
    from kernels.gemv import Tile
    from tests.helpers import tiny_model

    tile = lambda x, *args, **kwargs: Tile(1, 8, 64, rows=True)                   # noqa: E731
    monkeypatch.setattr(linear._Linear, "_streams", lambda self, x: isinstance(self, linear.ColumnParallelLinear))
    monkeypatch.setattr(tuner, "tuned_tile", tile)
    monkeypatch.setattr(linear, "FOLD_ROWS", 40)          # the fold's fp32 slices: several, the last ragged
    folded = []
    real = DecoderBlock._forward_folded
    monkeypatch.setattr(DecoderBlock, "_forward_folded", lambda self, *a: folded.append(1) or real(self, *a))
    layers = {"gpt_neo": dict(num_layers=1, attention_types=[[["global"], 1]], attention_layers=["global"]),
              "gptj": dict(n_layer=1), "llama": dict(num_hidden_layers=1)}[family]
    hf = tiny_model(family, **layers)
    settings = {} if quant is None else {"dtype": torch.int8} if quant == 8 else \
        {"dtype": "int4", "quant": {"weight": {"group_size": 32}}}
    engine = rayspeed.init_inference(hf, replace_with_kernel_inject=True, **({"dtype": torch.float32} | settings))
    ids = torch.randint(3, hf.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(0))
    got = engine.module(ids).logits
    assert len(folded) == sum(isinstance(m, DecoderBlock) for m in engine.backend.model.modules())
    monkeypatch.setattr(linear, "FOLD_NORMS", False)
    expected = engine.module(ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
