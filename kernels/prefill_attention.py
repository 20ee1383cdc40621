"""Causal attention of fresh prompts (nothing cached): a varlen Triton flash-attention kernel, all
sequences of a step in one launch, that also writes the new keys/values to the paged cache; and the
same through torch SDPA, one call per sequence, kept to time against it (bench/attention_sweep.py).
Masking as in kernels/attention.py (causal, optional local window, optional ALiBi); scores fp32."""
import os

import torch
import triton
import triton.language as tl

from kernels.pdl import await_previous
from kernels.pdl import enabled as programmatic_launch


@triton.jit
def _attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, start, n, q_pos, length, kv_head, head_dim, d, d_mask,
                  k_token_stride, v_token_stride, qk_scale, slope, window, MASKED: tl.constexpr,
                  USE_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [n, n + BLOCK_N) in the online softmax, in base 2 (scores carry log2(e), so exp2 needs no
    extra multiply). MASKED: apply causality, the window and the sequence end; blocks wholly visible
    skip that work. Returns the new state."""
    k_pos = n + tl.arange(0, BLOCK_N)
    kv_rows = (start + k_pos)[:, None]
    kv_mask = (k_pos < length)[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + kv_rows * k_token_stride + kv_head * head_dim + d[None, :], mask=kv_mask, other=0.0)
    if IEEE:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    else:
        scores = tl.dot(q, tl.trans(k)) * qk_scale                         # [BLOCK_M, BLOCK_N]
    rel = k_pos[None, :] - q_pos[:, None]                                  # key - query, <= 0 where visible
    if HAS_ALIBI:
        scores += slope * rel.to(tl.float32)
    if MASKED:
        visible = (rel <= 0) & (k_pos < length)[None, :]
        if USE_WINDOW:
            visible &= rel > -window
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptr + kv_rows * v_token_stride + kv_head * head_dim + d[None, :], mask=kv_mask, other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, cu_seqlens_ptr, alibi_ptr, out_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                    q_token_stride, q_head_stride, k_token_stride, v_token_stride, out_token_stride,
                    cache_block_stride, cache_row_stride, group, head_dim, scale, window,
                    USE_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr, STORE_KV: tl.constexpr,
                    CACHE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """One (query block of BLOCK_M, head, sequence) of a fresh prefill: flash attention (online softmax
    over key blocks of BLOCK_N) of the sequence's queries over its own keys, causal and, with
    USE_WINDOW, local. Query and key positions are their indices in the sequence (no cached prefix).
    Only the key blocks on the window's lower edge and across the diagonal are masked; those between
    are wholly visible. With STORE_KV, the program of each KV head's first query head also writes the
    keys and values at its own query positions to the cache slots `slots` gives (every position once:
    `store_kv` without a kernel of its own). With PDL, it waits for the kernels before it (the QKV
    product) only after its index math.

    Measured and not kept (H100, `*-2026-11-27-attention-prefill-*.json`, `*-prefill-ab-*.json`): two
    programs sharing each query block of 4-16 key blocks, merged by the one that finished second,
    took GPT-Neo's 512-token layers 18.9 / 19.4 us against 16.7 / 15.4 and the 512-token prefill
    6.06 against 5.67 ms; storing the keys from the diagonal step's own loads after the loop, 1-14 %
    faster up to 1,024 tokens and 4-7 % slower at 2,048-4,096, never moved the 512-token prefill."""
    # grid (heads, query blocks, seqs), the last query blocks (the most keys) launched first
    head, m_block, seq = tl.program_id(0), tl.num_programs(1) - 1 - tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)      # written before the step: safe before the wait
    length = (tl.load(cu_seqlens_ptr + seq + 1) - start).to(tl.int32)
    first = m_block * BLOCK_M                                            # the block's first query position
    if first >= length:
        return
    await_previous(PDL)
    kv_head = head // group
    q_pos = first + tl.arange(0, BLOCK_M)                                # [BLOCK_M]
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q_rows = (start + q_pos)[:, None]
    q_mask = (q_pos < length)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + q_rows * q_token_stride + head * q_head_stride + d[None, :], mask=q_mask, other=0.0)
    if STORE_KV:
        if head % group == 0:
            slot = tl.load(slots_ptr + start + q_pos, mask=q_pos < length, other=0)
            cache_rows = ((slot // CACHE_BLOCK) * cache_block_stride + (slot % CACHE_BLOCK) * cache_row_stride)[:, None]
            cache_offs = cache_rows + kv_head * head_dim + d[None, :]
            k_new = tl.load(k_ptr + q_rows * k_token_stride + kv_head * head_dim + d[None, :], mask=q_mask)
            v_new = tl.load(v_ptr + q_rows * v_token_stride + kv_head * head_dim + d[None, :], mask=q_mask)
            tl.store(k_cache_ptr + cache_offs, k_new, mask=q_mask)
            tl.store(v_cache_ptr + cache_offs, v_new, mask=q_mask)
    qk_scale = scale * 1.4426950408889634                                # log2(e): softmax in base 2
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + head).to(tl.float32) * 1.4426950408889634
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)      # finite: a row whose first block is all masked stays NaN-free
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # key blocks: [lo, full) on the window's lower edge, [full, diagonal) wholly visible to every query
    # of the block, [diagonal, first + BLOCK_M) across the diagonal
    diagonal = (first + 1) // BLOCK_N * BLOCK_N
    lo, full = 0, 0
    if USE_WINDOW:
        lo = tl.maximum(first - window + 1, 0) // BLOCK_N * BLOCK_N
        diagonal = tl.maximum(diagonal, lo)
        full = tl.minimum(tl.cdiv(tl.maximum(first + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N, diagonal)
    for n in range(lo, full, BLOCK_N):
        m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, start, n, q_pos, length, kv_head, head_dim,
                                      d, d_mask, k_token_stride, v_token_stride, qk_scale, slope, window, True,
                                      USE_WINDOW, HAS_ALIBI, IEEE, BLOCK_N)
    for n in range(full, diagonal, BLOCK_N):
        m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, start, n, q_pos, length, kv_head, head_dim,
                                      d, d_mask, k_token_stride, v_token_stride, qk_scale, slope, window, False,
                                      USE_WINDOW, HAS_ALIBI, IEEE, BLOCK_N)
    for n in range(diagonal, first + BLOCK_M, BLOCK_N):
        m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, start, n, q_pos, length, kv_head, head_dim,
                                      d, d_mask, k_token_stride, v_token_stride, qk_scale, slope, window, True,
                                      USE_WINDOW, HAS_ALIBI, IEEE, BLOCK_N)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]    # 0 only in rows past the sequence (not stored)
    tl.store(out_ptr + q_rows * out_token_stride + head * head_dim + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_mask)


def prefill_config(block_d: int) -> tuple[int, int, int, int]:
    """(query rows, keys a step, warps, stages) of the prefill kernel: 64 / 64 / 4 / 3, or 32 rows and
    keys for heads wider than 128 (q, k and the accumulator then fit registers and shared memory).
    Alone, back to back in a CUDA graph (`*-attention-prefill-keys.json`, H100), 2 stages were
    faster up to 1,024 tokens (GPT-Neo's 512-token layers 13.6 / 11.1 us against 14.2 / 13.2) and 32
    rows for prompts up to 64 tokens (32 prompts of 32: 8.1 against 13.3 us); keys wider than the
    query block never won. In the model the 512-token prefill's attention took the same time either
    way (507-564 us over 32 layers, profiles of both), and a choice by prompt length costs twice:
    the padded prefill graphs see their token bucket, not the longest prompt, so graph and eager
    prefills would run different kernels (their greedy tokens then part), and each configuration is
    one more compile on first use (the 256-in-flight run paid one: 7,243 tok/s against 32,400).
    RAYSPEED_PREFILL_CONFIG="rows,keys,warps,stages" sets it."""
    forced = os.environ.get("RAYSPEED_PREFILL_CONFIG")
    if forced:
        rows, keys, warps, stages = (int(v) for v in forced.split(","))
        return rows, keys, warps, stages
    rows = 64 if block_d <= 128 else 32
    return rows, rows, 4, 3


def prefill_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                             max_len: int, scale: float, window: int | None = None,
                             alibi_slopes: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
                             v_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                             block: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                             num_stages: int | None = None) -> torch.Tensor:
    """Causal attention of prompts with no cached prefix, from this step's k, v (not the cache): all
    sequences of the batch in one launch. q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads,
    head_dim] (strided views of the fused QKV output are fine); cu_seqlens: [seqs + 1] on q's device;
    max_len: the longest sequence. Same result as `paged_attention_torch` over a cache holding k, v.
    Given the caches and `slot_mapping` [tokens], it also writes k, v there (`store_kv` included).
    block / block_n / num_warps / num_stages: query rows and keys a step of each program, its warps and
    pipeline stages (`prefill_config`'s choice where not given)."""
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == v.shape == (tokens, num_kv_heads, head_dim), \
        f"k, v must be [{tokens}, kv_heads, {head_dim}], got {tuple(k.shape)}, {tuple(v.shape)}"
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and k.stride(1) == v.stride(1) == head_dim, \
        "q, k, v must be contiguous per head"
    assert num_heads % num_kv_heads == 0, f"num_heads {num_heads} not a multiple of kv heads {num_kv_heads}"
    assert head_dim <= 256, f"head_dim up to 256 supported, got {head_dim}"
    assert cu_seqlens.device == q.device and cu_seqlens.dim() == 1, "cu_seqlens: [seqs + 1] on q's device"
    assert window is None or window >= 1, f"window must be >= 1, got {window}"
    if alibi_slopes is not None:
        assert alibi_slopes.shape == (num_heads,) and alibi_slopes.device == q.device, f"alibi_slopes: [{num_heads}]"
    store = k_cache is not None
    if store:
        assert v_cache is not None and slot_mapping is not None, "k_cache needs v_cache and slot_mapping"
        assert k_cache.shape == v_cache.shape and k_cache.is_contiguous() and v_cache.is_contiguous(), \
            "k_cache, v_cache: contiguous, same shape"
        assert k_cache.shape[2:] == (num_kv_heads, head_dim) and k_cache.dtype == k.dtype, \
            f"cache rows {tuple(k_cache.shape[2:])} {k_cache.dtype} do not hold k {(num_kv_heads, head_dim)} {k.dtype}"
        assert slot_mapping.shape == (tokens,), f"slot_mapping must be [{tokens}]"
    out = torch.empty((tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    num_seqs = cu_seqlens.numel() - 1
    if tokens == 0 or num_seqs == 0:
        return out
    block_d = max(triton.next_power_of_2(head_dim), 16)
    config = prefill_config(block_d)
    block, block_n = block or config[0], block_n or block or config[1]
    num_warps, num_stages = num_warps or config[2], num_stages or config[3]
    pdl = programmatic_launch(q)
    grid = (num_heads, triton.cdiv(max_len, block), num_seqs)
    _prefill_kernel[grid](q, k, v, cu_seqlens, q if alibi_slopes is None else alibi_slopes, out,
                          k_cache if store else q, v_cache if store else q, slot_mapping if store else cu_seqlens,
                          q.stride(0), q.stride(1), k.stride(0), v.stride(0), out.stride(0),
                          k_cache.stride(0) if store else 0, k_cache.stride(1) if store else 0,
                          num_heads // num_kv_heads, head_dim, scale, window or 0,
                          USE_WINDOW=window is not None, HAS_ALIBI=alibi_slopes is not None,
                          IEEE=q.dtype == torch.float32, STORE_KV=store,
                          CACHE_BLOCK=k_cache.shape[1] if store else 1, BLOCK_M=block, BLOCK_N=block_n, BLOCK_D=block_d,
                          PDL=pdl, num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl)
    return out


def prefill_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                           scale: float, window: int | None = None,
                           alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """`prefill_attention_triton` through torch SDPA, one call per sequence: flash attention when there
    is no mask (no ALiBi, no window shorter than the sequence), else SDPA's masked kernels.
    Kept to time against the Triton kernel (bench/attention_sweep.py); cu_seqlens on the host."""
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for start, end in zip(cu_seqlens, cu_seqlens[1:]):
        # [1, heads, len, head_dim]: SDPA's fused kernels take 4-D inputs only (3-D falls back to math)
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        mask = None
        if alibi_slopes is not None or (window is not None and window < end - start):
            pos = torch.arange(end - start, device=q.device)
            rel = pos[None, :] - pos[:, None]                                # [len, len]: key - query
            visible = (rel <= 0) & ((rel > -window) if window is not None else True)
            mask = torch.zeros(rel.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
            if alibi_slopes is not None:
                mask = mask + (alibi_slopes[:, None, None] * rel).to(q.dtype)
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None,
                                                             scale=scale, enable_gqa=gqa)
        out[start:end] = o[0].transpose(0, 1)
    return out
