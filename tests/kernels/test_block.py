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
