"""Decode attention and the attention output projection in one kernel, for steps of one or two
sequences with short contexts.

At batch 1 decode attention runs one program per head (GPT-Neo 2.7B: 20 programs on 132 SMs, the
HBM idle), and the output projection after it, a small product, starts only when the last head is
done. Here program (n block, head, sequence) reads its slice of the projection's weight (the block's
rows, the head's columns) before waiting for the QKV product, attends for its head (the loop of
kernels/attention.py, EARLY mode), and multiplies its head's output into its rows: fp32 partial
sums [heads, seqs, N] that `_split_k_reduce_kernel` adds up in head order, with bias and residual.
Every n block of a head repeats its attention (the head's keys and values come from L2 after the
first), so this pays only while contexts are short (`FUSED_MAX_CONTEXT`).

Weights as in kernels/quant.py: fp16/bf16 [N, K]; int8 [N, K]; int4 [N, K // 2] (column 2j in the
low nibble, value nibble - 8); scales [N, K // group_size]."""
import os

import torch
import triton
import triton.language as tl

from kernels.attention import _attend_chunks_early, _cached_chunk, _check_decode_inputs, _new_token_state
from kernels.gemv import _split_k_reduce_kernel
from kernels.gemv_epilogue import ACTIVATION_CODES
from kernels.pdl import await_previous
from kernels.pdl import enabled as programmatic_launch

FUSED_MAX_CONTEXT = 256      # positions a fused step's tables may span (the short decode graphs', actors/cuda_graphs.py)
FUSED_MAX_SEQS = 2
CHUNK = 64


@triton.jit
def _weight_slice(w_ptr, s_ptr, rn, n_mask, head, head_dim, stride_wn, stride_sn, group_size, BITS: tl.constexpr,
                  PER_ROW_SCALE: tl.constexpr, BLOCK_D: tl.constexpr):
    """The weight of rows rn at this head's columns as stored ([BN, BLOCK_D]; int4 [BN, BLOCK_D // 2]
    bytes), and its scales: [BN] with PER_ROW_SCALE, else per element (int4: per byte), else ones."""
    if BITS == 4:
        j = tl.arange(0, BLOCK_D // 2)
        col = head * head_dim + 2 * j                                   # the byte's even column
        mask = n_mask[:, None] & (2 * j < head_dim)[None, :]
        w = tl.load(w_ptr + rn[:, None] * stride_wn + (col // 2)[None, :], mask=mask, other=0x88)
    else:
        col = head * head_dim + tl.arange(0, BLOCK_D)
        mask = n_mask[:, None] & (tl.arange(0, BLOCK_D) < head_dim)[None, :]
        w = tl.load(w_ptr + rn[:, None] * stride_wn + col[None, :], mask=mask, other=0)
    if BITS == 16:
        s = tl.full(rn.shape, 1.0, tl.float32)
    elif PER_ROW_SCALE:
        s = tl.load(s_ptr + rn * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
    else:
        s = tl.load(s_ptr + rn[:, None] * stride_sn + (col // group_size)[None, :], mask=mask, other=0.0)
    return w, s


@triton.jit
def _decode_attention_out_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, alibi_ptr,
                                 k_new_ptr, v_new_ptr, slots_ptr, w_ptr, s_ptr, ws_ptr,
                                 q_seq_stride, q_head_stride, k_new_stride, v_new_stride, cache_block_stride,
                                 cache_row_stride, table_stride, group, head_dim, scale, window, num_seqs, N,
                                 stride_wn, stride_sn, group_size,
                                 USE_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, BITS: tl.constexpr,
                                 PER_ROW_SCALE: tl.constexpr, BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """ws[head, seq, n] = attention(head, seq) . W[n, head's columns] for the BLOCK_N rows n of this
    program. Before the PDL wait: the weight slice and the first chunk of cached keys and values
    (earlier steps wrote them). The first n block of each KV head's first query head writes this
    step's key and value to the cache; no program reads that slot."""
    pid_n, head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    w, s = _weight_slice(w_ptr, s_ptr, rn, n_mask, head, head_dim, stride_wn, stride_sn, group_size, BITS,
                         PER_ROW_SCALE, BLOCK_D)
    kv_head = head // group
    ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
    q_pos = ctx - 1
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    first = 0
    if USE_WINDOW:
        first = tl.maximum(q_pos - window + 1, 0)
    head_offs = kv_head * head_dim + d
    cached = ctx - 1                                                    # this step's token comes from k_new/v_new
    c_first, c_end = first // CHUNK, tl.cdiv(cached, CHUNK)
    k, v = _cached_chunk(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, table_stride, cache_block_stride,
                         cache_row_stride, head_offs, d_mask, c_first, first, cached, BLOCK_SIZE, CHUNK)
    await_previous(PDL)
    q = tl.load(q_ptr + seq * q_seq_stride + head * q_head_stride + d, mask=d_mask, other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + head).to(tl.float32)
    m, l, acc = _new_token_state(q.to(tl.float32), k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, seq,
                                 k_new_stride, v_new_stride, cache_block_stride, cache_row_stride, head_offs, d_mask,
                                 scale, (pid_n == 0) & (head % group == 0), BLOCK_SIZE)
    m, l, acc = _attend_chunks_early(q.to(tl.float32), k, v, m, l, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                                     seq, table_stride, cache_block_stride, cache_row_stride, head_offs, d_mask,
                                     c_first, c_end, first, cached, q_pos, scale, slope, HAS_ALIBI, BLOCK_SIZE, CHUNK,
                                     BLOCK_D)
    o = (acc / l).to(q.dtype).to(tl.float32)               # the attention output, rounded as the unfused path stores it
    if BITS == 4:                                           # byte j multiplies o[2j] (low nibble), o[2j + 1] (high)
        o_even, o_odd = tl.split(tl.reshape(o, (BLOCK_D // 2, 2)))
        w = w.to(tl.int32)
        wq = ((w & 0xF) - 8).to(tl.float32) * o_even[None, :] + ((w >> 4) - 8).to(tl.float32) * o_odd[None, :]
    else:
        wq = w.to(tl.float32) * o[None, :]
    if PER_ROW_SCALE or BITS == 16:
        part = tl.sum(wq, axis=1) * s
    else:
        part = tl.sum(wq * s.to(tl.float32), axis=1)
    tl.store(ws_ptr + (head * num_seqs + seq) * N + rn, part, mask=n_mask)


def fused_block_n(bits: int) -> tuple[int, int]:
    """(rows a program, warps): the weight slice held in registers through attention stays at 32 KB a
    program (int8 256 x 128; fp16 128 x 128). RAYSPEED_ATTN_OUT="block_n,warps" sets it."""
    forced = os.environ.get("RAYSPEED_ATTN_OUT")
    if forced:
        block_n, warps = (int(v) for v in forced.split(","))
        return block_n, warps
    return (128 if bits == 16 else 256), 4


def fuses(q: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> bool:
    """Whether a decode step of q [seqs, heads, head_dim] may run `decode_attention_out`: at most
    FUSED_MAX_SEQS sequences whose tables span at most FUSED_MAX_CONTEXT positions (RAYSPEED_ATTN_OUT=0
    turns it off)."""
    return (os.environ.get("RAYSPEED_ATTN_OUT") != "0" and q.shape[0] <= FUSED_MAX_SEQS
            and block_tables.shape[1] * block_size <= FUSED_MAX_CONTEXT)


def decode_attention_out(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                         slot_mapping: torch.Tensor, scale: float, window: int | None,
                         alibi_slopes: torch.Tensor | None, weight: torch.Tensor, scales: torch.Tensor | None,
                         bits: int, group_size: int | None, bias: torch.Tensor | None = None,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    """attention(q) (this step's k_new, v_new written to the cache) flattened over heads, times the
    output projection's (dequantized) weight [N, heads * head_dim] transposed, + bias + residual:
    [seqs, N] in q's dtype. The same as `attention` followed by the projection, one kernel and a
    reduction instead of two kernels."""
    _check_decode_inputs(q, k_cache, v_cache, block_tables, context_lens, alibi_slopes)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert k_new.shape == v_new.shape == (num_seqs, num_kv_heads, head_dim), \
        f"k_new/v_new must be [{num_seqs}, {num_kv_heads}, {head_dim}], got {tuple(k_new.shape)}"
    assert k_new.stride()[1:] == v_new.stride()[1:] == (head_dim, 1), "k_new, v_new: contiguous per token"
    n, k = weight.shape[0], num_heads * head_dim
    assert weight.shape[1] == (k // 2 if bits == 4 else k) and weight.stride(1) == 1, \
        f"weight {tuple(weight.shape)} does not fit K={k} at {bits} bits"
    group_size = group_size or k
    per_row = bits < 16 and group_size >= k
    assert bits == 16 or per_row or group_size % 2 == 0, f"int4 groups must hold whole bytes, got {group_size}"
    out = torch.empty(num_seqs, n, dtype=q.dtype, device=q.device)
    if residual is not None:
        assert residual.shape == out.shape and residual.stride(-1) == 1, \
            f"residual {tuple(residual.shape)} must be contiguous [{num_seqs}, {n}]"
    if num_seqs == 0:
        return out
    block_n, warps = fused_block_n(bits)
    ws = torch.empty(num_heads, num_seqs, n, dtype=torch.float32, device=q.device)
    pdl = programmatic_launch(q)
    _decode_attention_out_kernel[(triton.cdiv(n, block_n), num_heads, num_seqs)](
        q, k_cache, v_cache, block_tables, context_lens, q if alibi_slopes is None else alibi_slopes,
        k_new, v_new, slot_mapping, weight, weight if scales is None else scales, ws,
        q.stride(0), q.stride(1), k_new.stride(0), v_new.stride(0), k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0), num_heads // num_kv_heads, head_dim, scale, window or 0, num_seqs, n,
        weight.stride(0), 0 if scales is None else scales.stride(0), group_size,
        USE_WINDOW=window is not None, HAS_ALIBI=alibi_slopes is not None, BITS=bits, PER_ROW_SCALE=per_row,
        BLOCK_SIZE=block_size, CHUNK=max(block_size, CHUNK), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_N=block_n, PDL=pdl, num_warps=warps, launch_pdl=pdl)
    dummy = ws
    block_m = min(16, triton.next_power_of_2(num_seqs))
    _split_k_reduce_kernel[(triton.cdiv(n, 256), triton.cdiv(num_seqs, block_m))](
        ws, dummy if bias is None else bias, dummy if residual is None else residual, out, num_seqs, n,
        0 if residual is None else residual.stride(0), SPLIT_K=num_heads, HAS_BIAS=bias is not None,
        ACT=ACTIVATION_CODES[None], HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=256, PDL=pdl,
        launch_pdl=pdl)
    return out
