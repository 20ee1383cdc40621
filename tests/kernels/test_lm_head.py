"""The LM head in padded storage: checkpoints see [vocab, width]; the padded product gives the same logits."""
import pytest
import torch
import torch.nn.functional as F

from kernels.linear import default_weight_loader
from kernels.model import VOCAB_PAD, _padded_rows, _replicated, lm_head_logits, with_padding

VOCAB, WIDTH = 50257 % 1000 + 1000, 16          # 1257: odd, as GPT-Neo's 50257


def _loaded(*shape):
    p = _replicated(*shape, dtype=torch.float32, padded=True)
    full = torch.randn(*shape)
    p.weight_loader(p, full)
    return p, full


def test_parameter_has_checkpoint_shape_and_zero_padding():
    p, full = _loaded(VOCAB, WIDTH)
    assert p.shape == (VOCAB, WIDTH) and p.weight_loader is default_weight_loader and p.tp_dim is None
    wide = with_padding(p)
    assert wide.shape == (-(-VOCAB // VOCAB_PAD) * VOCAB_PAD, WIDTH)
    assert torch.equal(wide[:VOCAB], full) and not wide[VOCAB:].any()
    with pytest.raises(ValueError, match="shape mismatch"):
        p.weight_loader(p, torch.randn(VOCAB + 1, WIDTH))


@pytest.mark.parametrize("with_bias", [False, True])
def test_padded_logits_equal_the_plain_product(with_bias):
    weight, _ = _loaded(VOCAB, WIDTH)
    bias = _loaded(VOCAB)[0] if with_bias else None
    hidden = torch.randn(5, WIDTH)
    got = lm_head_logits(hidden, weight, bias, padded=True)
    assert got.shape == (5, VOCAB) and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(hidden, weight, bias), rtol=1e-6, atol=1e-6)


def test_a_compact_tensor_is_used_as_it_is():
    """A weight replaced by a compact tensor (no padded storage) and a bias that kept its padding."""
    weight = torch.randn(VOCAB, WIDTH)
    bias = _padded_rows(VOCAB, dtype=torch.float32)
    bias.normal_()
    assert with_padding(weight) is weight
    hidden = torch.randn(3, WIDTH)
    torch.testing.assert_close(lm_head_logits(hidden, weight, bias, padded=True), F.linear(hidden, weight, bias))
