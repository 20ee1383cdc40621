"""Decode attention fused with the attention output projection (kernels/attention_out.py), run on
CPU by Triton's interpreter, against the torch reference of attention followed by an fp64 product."""
import pytest
import torch

from kernels.attention_out import decode_attention_out, fuses
from kernels.attention_torch import paged_attention_torch, store_kv
from tests.kernels.test_gemv import _weight


@pytest.mark.parametrize("bits,group,window,alibi,dtype", [
    (16, None, None, False, torch.float32), (8, None, 3, False, torch.float16), (8, 32, None, True, torch.float16),
    (4, 32, None, False, torch.float16), (4, None, 5, False, torch.float32)])
def test_matches_attention_then_projection(bits, group, window, alibi, dtype):
    """Two sequences (contexts 7 and 19 over scattered cache blocks), grouped KV heads, a local window
    or ALiBi, every weight format: the projection of attention's output plus bias and residual, and
    this step's keys and values written to their slots exactly as `store_kv` writes them."""
    g = torch.Generator().manual_seed(bits)
    seqs, heads, kv_heads, head_dim, block_size, n = 2, 4, 2, 32, 8, 40
    k_cache = torch.randn(12, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(12, block_size, kv_heads, head_dim, generator=g).to(dtype)
    context_lens = torch.tensor([7, 19], dtype=torch.int32)
    tables = torch.tensor([[3, 0, 0], [5, 1, 9]], dtype=torch.int32)
    slots = torch.tensor([3 * block_size + 6, 9 * block_size + 2])
    q = torch.randn(seqs, heads, head_dim, generator=g).to(dtype)
    k_new, v_new = (torch.randn(seqs, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    w, scales, full = _weight(n, heads * head_dim, bits, group or heads * head_dim, g)
    w, scales = (w.to(dtype) if bits == 16 else w), (None if scales is None else scales.to(dtype))
    slopes = torch.rand(heads, generator=g) if alibi else None
    bias, residual = torch.randn(n, generator=g).to(dtype), torch.randn(seqs, n, generator=g).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    got = decode_attention_out(q, k_new, v_new, k_cache, v_cache, tables, context_lens, slots, 0.3, window, slopes,
                               w, scales, bits, group, bias, residual)
    store_kv(k_new, v_new, k_ref, v_ref, slots)
    o = paged_attention_torch(q, k_ref, v_ref, tables, context_lens, torch.arange(seqs + 1, dtype=torch.int32), 0.3,
                              window, slopes)
    ref = o.flatten(1).double() @ full.double().T + bias.double() + residual.double()
    assert got.dtype == dtype and got.shape == (seqs, n)
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < (1e-6 if dtype == torch.float32 else 2e-3)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_fuses_only_short_contexts_of_few_sequences(monkeypatch):
    q, tables = torch.zeros(2, 4, 32), torch.zeros(2, 16, dtype=torch.int32)
    assert fuses(q, tables, 16) and not fuses(q, tables, 32) and not fuses(torch.zeros(3, 4, 32), tables[:1], 16)
    monkeypatch.setenv("RAYSPEED_ATTN_OUT", "0")
    assert not fuses(q, tables, 16)
