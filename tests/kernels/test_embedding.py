"""The fused token + position embedding kernel against torch's lookups and add (TRITON_INTERPRET=1 on CPU)."""
import pytest
import torch

from kernels.embedding import embed_torch, embed_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_positions, offset", [(True, 0), (True, 2), (False, 0)])
def test_embedding_matches_lookups_and_add(dtype, with_positions, offset):
    """Width 80 (not a power of two), repeated ids, OPT's position offset of 2; fp16 rounds once, as
    torch's add does."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(50, 80, generator=g).to(dtype)
    pos_table = torch.randn(40, 80, generator=g).to(dtype) if with_positions else None
    ids = torch.tensor([3, 49, 0, 3, 17, 8, 8])
    positions = torch.tensor([0, 1, 2, 3, 30, 31, 37])
    expected = embed_torch(ids, positions, tokens, pos_table, offset)
    got = embed_triton(ids, positions, tokens, pos_table, offset)
    assert got.dtype == dtype and torch.equal(got, expected)


def test_no_tokens_give_an_empty_tensor():
    tokens = torch.randn(10, 16)
    none = torch.zeros(0, dtype=torch.long)
    assert embed_triton(none, none, tokens, None).shape == (0, 16)
