"""Weight-streaming matmul for few rows: y = x W^T (+ bias) with W in fp16/bf16, int8 or packed int4.

Decode multiplies a handful of token rows by every weight of the model once per step, so its speed
is the rate at which the weights stream from HBM. Three kernels cover the three weight formats of
`kernels.quant` and dequantize in registers (no full-precision copy of a quantized weight exists
for a decode product), bias, activation and residual fused:
- `_fma_kernel`, one row per program on the CUDA cores: the weight goes from HBM straight to
  registers; the fastest at one or two rows (bench/results/*-gemv-fma.json); int4 weights against
  fp16 x also in packed fp16 arithmetic (`half` tiles, `int4_half_dot`);
- `_skinny_kernel`, tensor-core tiles of at least 16 rows (rows past M are zeros: free for a
  memory-bound product);
- `_swap_kernel`, the same with the operands swapped (weight rows on the instruction's long side),
  for 16-bit and int8 weights at decode batches, with PDL.
Each program owns `BLOCK_N` output features and walks its slice of K in `BLOCK_K` tiles;
`SPLIT_K` > 1 gives every output tile several programs (enough of them to fill the GPU when N is
small) whose fp32 partial sums a second, tiny kernel adds up in a fixed order, so results do not
depend on timing. Which tile, which kernel (and whether cuBLAS beats both, for float weights) is
measured once per shape on the device at the engine's start-up: kernels/gemv_tuner.py. Quantized
products of many rows (prefill) dequantize the weight once instead (kernels/dequant.py).

Formats (see kernels/quant.py): bits=16 `weight [N, K]`; bits=8 `qweight int8 [N, K]`; bits=4
`qweight uint8 [N, K // 2]`, column 2j in the low nibble and 2j+1 in the high, value nibble - 8;
`scales [N, K // group_size]`, w = q * scales[n, k // group_size].
"""
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.pdl import await_previous, prefetch_l2, prefetch_rows_l2
from kernels.pdl import enabled as programmatic_launch
from kernels.unpack import (high_half, int4_half_dot, int8_half_dot, low_half, nibble_minus_8, one_plus_sixteenth,
                            s8_to, s8_to_f32)


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    scale_in_tile: bool = False    # quantized: scale each weight in registers (tiles may span K-groups)
    fma: bool = False              # `_fma_kernel` (CUDA cores, one row per program; block_m 1) instead
    prefetch: bool = False         # fma: load the next K tile before multiplying this one
    half: bool = False             # fma, int4 weights, fp16 x: packed fp16 arithmetic (`int4_half_dot`)
    x_per_row: bool = False        # fma: every thread loads the x of its own weights (see `_fma_kernel`)
    swap: bool = False             # `_swap_kernel` (weight rows on the MMA's long side; 16/8 bits) instead
    l2_rows: int = 0               # swap: bytes of each weight row a program asks the L2 for before its PDL wait


ACTIVATION_CODES = {None: 0, "gelu_tanh": 1, "gelu": 2, "relu": 3, "silu": 4}


@triton.jit
def _epilogue(acc, rm, rn, M, N, b_ptr, r_ptr, stride_rm, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
              HAS_RESIDUAL: tl.constexpr):
    """fp32 [BM, BN] -> act(acc + bias) + residual, in that order."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:                                       # tanh GELU; tanh(y) = 2 sigmoid(2y) - 1
        inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = acc * tl.sigmoid(2.0 * inner)
    elif ACT == 2:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    elif ACT == 3:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 4:
        acc = acc * tl.sigmoid(acc)
    if HAS_RESIDUAL:
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        acc += tl.load(r_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, s_ptr, b_ptr, r_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                   stride_rm, stride_om, stride_os, group_size, k_per_split,
                   BITS: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                   HAS_RESIDUAL: tl.constexpr, PER_ROW_SCALE: tl.constexpr, SCALE_IN_TILE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[BM, BN] = x[BM, K-slice] @ w[BN, K-slice]^T on the tensor cores (rows past M are zeros: a
    memory-bound product pays nothing for them); weights are converted to x's dtype in registers
    (int8 and int4 values are exact in fp16 and bf16) and scaled per tile or per row in fp32. Launched
    without programmatic dependent launch: with it, int8 decode at batch 32 was 8 % slower."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if SCALE_IN_TILE:                              # dequantize the whole tile, then one product
            rk = k0 + tl.arange(0, BLOCK_K)
            k_mask = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & k_mask[None, :],
                        other=0.0)
            if BITS == 4:
                rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                packed = tl.load(w_ptr + rn[:, None] * stride_wn + rb[None, :],
                                 mask=n_mask[:, None] & (rb[None, :] < K // 2), other=0x88).to(tl.int32)
                q = tl.reshape(tl.join((packed & 0xF) - 8, (packed >> 4) - 8), (BLOCK_N, BLOCK_K))
            else:
                q = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_mask[:, None] & k_mask[None, :],
                            other=0)
            scale = tl.load(s_ptr + rn[:, None] * stride_sn + (rk // group_size)[None, :],
                            mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            w = (q.to(tl.float32) * scale.to(tl.float32)).to(x.dtype)
            part = tl.dot(x, tl.trans(w), input_precision="ieee")
        elif BITS == 4:                                # packed pairs: even columns low nibble, odd high
            rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + rn[:, None] * stride_wn + rb[None, :],
                             mask=n_mask[:, None] & (rb[None, :] < K // 2), other=0x88).to(tl.int32)
            rk = k0 + 2 * tl.arange(0, BLOCK_K // 2)
            x_mask = (rm[:, None] < M) & (rk[None, :] < K)
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=x_mask, other=0.0)
            x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] + 1, mask=x_mask, other=0.0)
            low = nibble_minus_8(packed & 0xF, x_even.dtype)
            high = nibble_minus_8(packed >> 4, x_even.dtype)
            part = tl.dot(x_even, tl.trans(low), input_precision="ieee")
            part = tl.dot(x_odd, tl.trans(high), part, input_precision="ieee")
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                        other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_mask[:, None] & (rk[None, :] < K),
                        other=0)
            part = tl.dot(x, tl.trans(s8_to(w, x.dtype) if BITS == 8 else w), input_precision="ieee")
        if BITS < 16 and not PER_ROW_SCALE and not SCALE_IN_TILE:   # one scale per (row, K group) per tile
            scale = tl.load(s_ptr + rn * stride_sn + k0 // group_size, mask=n_mask, other=0.0).to(tl.float32)
            acc += part * scale[None, :]
        else:
            acc += part
    if PER_ROW_SCALE:
        acc *= tl.load(s_ptr + rn * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE:                                       # without split-K; the reduction applies it otherwise
        acc = _epilogue(acc, rm, rn, M, N, b_ptr, r_ptr, stride_rm, HAS_BIAS, ACT, HAS_RESIDUAL)
    out_mask = (rm[:, None] < M) & n_mask[None, :]
    offsets = pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _swap_kernel(x_ptr, w_ptr, s_ptr, b_ptr, r_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                 stride_rm, stride_om, stride_os, group_size, k_per_split,
                 BITS: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, PER_ROW_SCALE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                 L2_ROWS: tl.constexpr):
    """`_skinny_kernel`'s product with the operands swapped, for 16-bit and int8 weights:
    acc[BN, BM] = w[BN, K-slice] @ x[BM, K-slice]^T, so the weight's output features fill the long
    side of the tensor-core instruction (Hopper's wgmma is 64 rows a warp group) and x's few rows its
    short side (8 to 256), the way cuBLAS's skinny kernels run; transposed once for the epilogue.
    Launched with PDL where on: with L2_ROWS, each program first asks the L2 for that many bytes of
    the K slice of each of its weight rows (one bulk prefetch a row; they never change), then waits
    for the kernel that wrote x."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if L2_ROWS:                                        # bytes [start, start + L2_ROWS) of each row, inside it
        start = tl.minimum(k_begin * (BITS // 8), K * (BITS // 8) - L2_ROWS)
        rows = tl.minimum(rn, N - 1).to(tl.int64) * (stride_wn * (BITS // 8))
        prefetch_rows_l2(w_ptr.to(tl.pointer_type(tl.int8)) + rows + start, L2_ROWS)
    await_previous(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < k_end
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & k_mask[None, :],
                    other=0.0)
        part = tl.dot(s8_to(w, x.dtype) if BITS == 8 else w, tl.trans(x), input_precision="ieee")
        if BITS < 16 and not PER_ROW_SCALE:           # one scale per (row, K group) per tile
            scale = tl.load(s_ptr + rn * stride_sn + k0 // group_size, mask=n_mask, other=0.0).to(tl.float32)
            part = part * scale[:, None]
        acc += part
    if PER_ROW_SCALE:
        acc *= tl.load(s_ptr + rn * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    acc = tl.trans(acc)                                # [BM, BN]
    if EPILOGUE:
        acc = _epilogue(acc, rm, rn, M, N, b_ptr, r_ptr, stride_rm, HAS_BIAS, ACT, HAS_RESIDUAL)
    out_mask = (rm[:, None] < M) & n_mask[None, :]
    offsets = pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _fma_weights(w_ptrs, k0, k_end, cols, n_mask, BITS: tl.constexpr, HALF: tl.constexpr):
    """The raw weight tile at K offset k0: [BN, NG, SV, VEC] stored elements (bytes at 4 bits, 32-bit
    words of 8 nibbles or 4 int8 with HALF); nothing at or past k_end is read."""
    mask_n = n_mask[:, None, None, None]
    if HALF:              # K and the split hold whole 16-byte vectors: in or out; padding weighs nothing
        per_word: tl.constexpr = 8 if BITS == 4 else 4
        start, end = tl.multiple_of(k0 // per_word, 4), tl.multiple_of(k_end // per_word, 4)
        w = tl.load(w_ptrs + start, mask=mask_n & (start + cols < end)[None],
                    other=-0x77777778 if BITS == 4 else 0)
    elif BITS == 4:
        w = tl.load(w_ptrs + k0 // 2, mask=mask_n & (k0 // 2 + cols < k_end // 2)[None], other=0x88)
    else:
        w = tl.load(w_ptrs + k0, mask=mask_n & (k0 + cols < k_end)[None], other=0)
    return w


@triton.jit
def _rows(x, X_PER_ROW: tl.constexpr):
    """An x tile against the [BN, ...] weight tile: as loaded with X_PER_ROW, else broadcast over rows."""
    if not X_PER_ROW:
        x = x[None]
    return x


@triton.jit
def _two_words(low, high):
    return (low.to(tl.int64) & 0xFFFFFFFF) | (high.to(tl.int64) << 32)


@triton.jit
def _fma_x(x_ptr, x_row, k0, k_end, cols, BITS: tl.constexpr, HALF: tl.constexpr):
    """(xa, xb): the x values the weight tile at k0 multiplies, [NG, SV, VEC]; at 4 bits those each
    byte's low / high nibble pairs with (one 32-bit word per pair for 16-bit x), otherwise xa = xb = x.
    With HALF, per int4 weight word (columns 8c .. 8c + 7) the fp16 pairs `int4_half_dot` takes, two
    to a 64-bit integer: xa = x0 | x1 << 32, xb = x2 | x3 << 32 (elementwise, so the tensors keep the
    weights' register layout; a join along a new axis made Triton convert through shared memory);
    per int8 word (columns 4c .. 4c + 3) the two 32-bit words of its x pairs, read as one 64-bit word."""
    if HALF and BITS == 8:                             # x[4c .. 4c + 3] in one 64-bit word
        quad = tl.load(x_row.to(tl.pointer_type(tl.int64)) + k0 // 4 + cols, mask=k0 // 4 + cols < k_end // 4, other=0)
        xa, xb = quad.to(tl.int32), (quad >> 32).to(tl.int32)
    elif HALF:
        words = x_row.to(tl.pointer_type(tl.int32)) + k0 // 2 + 4 * cols     # x[8c], x[8c + 1]; then + 2, ...
        mask = k0 // 2 + 4 * cols < k_end // 2
        w0 = tl.load(words, mask=mask, other=0)                              # (x[8c], x[8c + 1])
        w1 = tl.load(words + 1, mask=mask, other=0)                          # (x[8c + 2], x[8c + 3])
        w2 = tl.load(words + 2, mask=mask, other=0)
        w3 = tl.load(words + 3, mask=mask, other=0)
        x0 = (w0 & 0xFFFF) | (w2 << 16)                                      # (x[8c], x[8c + 4])
        x1 = ((w0 >> 16) & 0xFFFF) | ((w2 >> 16) << 16)                      # (x[8c + 1], x[8c + 5])
        x2 = (w1 & 0xFFFF) | (w3 << 16)
        x3 = ((w1 >> 16) & 0xFFFF) | ((w3 >> 16) << 16)
        xa, xb = _two_words(x0, x1), _two_words(x2, x3)
    elif BITS == 4:
        kw = k0 // 2 + cols                            # byte column = index of the word of its x pair
        if x_ptr.dtype.element_ty.primitive_bitwidth == 16:
            pair = tl.load(x_row.to(tl.pointer_type(tl.int32)) + kw, mask=kw < k_end // 2, other=0)
            xa, xb = low_half(pair, x_ptr.dtype.element_ty), high_half(pair, x_ptr.dtype.element_ty)
        else:
            xa = tl.load(x_row + 2 * kw, mask=kw < k_end // 2, other=0.0)
            xb = tl.load(x_row + 2 * kw + 1, mask=kw < k_end // 2, other=0.0)
    else:
        xa = tl.load(x_row + k0 + cols, mask=k0 + cols < k_end, other=0.0)
        xb = xa
    return xa, xb


@triton.jit
def _fma_kernel(x_ptr, w_ptr, s_ptr, b_ptr, r_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                stride_rm, stride_om, stride_os, group_size, k_per_split, l2_bytes,
                BITS: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr, PER_ROW_SCALE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr, PREFETCH: tl.constexpr,
                PDL: tl.constexpr, HALF: tl.constexpr, ASM: tl.constexpr, X_PER_ROW: tl.constexpr,
                L2_LANES: tl.constexpr = 0, L2_CHUNK: tl.constexpr = 2048):
    """The same product for one row of x per program, on the CUDA cores. The weight goes from HBM
    straight to registers (no shared-memory staging, no 16-row padding) in [BN, BK // SUB, SV, VEC]
    tiles: SUB values (SV vectors) share one scale (SUB divides the group size), so scales broadcast
    over the last two axes. VEC is chosen so a thread's weights and x values have the same layout
    (8 weights against 16 bytes of x; at 4 bits 4 bytes against 4 words of x pairs), so nothing
    round-trips through shared memory inside the loop. Products accumulate in fp32 per element;
    one reduction after the loop. int8 becomes float by the mantissa trick of `s8_to_f32`, int4 as
    `one_plus_sixteenth` with the offset taken off per x value (bench/kernel_report.py: 434 instead
    of 465 SASS instructions per 8 x 1024 int4 tile). PREFETCH issues tile i+1's loads before tile
    i's arithmetic (Triton pipelines only loads that feed a dot); with PDL (kernels/pdl.py) its first
    weight tile is read before waiting for the kernel that produced x. HALF (int4 or int8, fp16 x) reads
    the weights as 32-bit words, 4 to a vector, and multiplies in packed fp16 (`int4_half_dot`,
    `int8_half_dot`, their
    inline assembly with ASM, Triton operations without). X_PER_ROW loads x through pointers spread
    over the tile's rows, so x arrives in the weights' register layout: the Triton 3.6 build
    otherwise exchanges it through shared memory every step (3.9's does not; the tuner decides).
    With L2_LANES, the first programs of row 0 each ask the L2 for L2_LANES * L2_CHUNK bytes of the
    weight, its first `l2_bytes` in all, before waiting for the previous kernel (`_l2_prefetch_bytes`)."""
    pid_n, pid_k, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if L2_LANES:
        first = (pid_n + pid_k * tl.num_programs(0)).to(tl.int64) * (L2_LANES * L2_CHUNK)
        if (row == 0) & (first < l2_bytes):
            prefetch_l2(w_ptr, first, l2_bytes, L2_LANES, L2_CHUNK)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    NG: tl.constexpr = BLOCK_K // SUB
    VEC: tl.constexpr = 4 if BITS == 4 or HALF else 8
    STORED: tl.constexpr = SUB // (8 if BITS == 4 else 4) if HALF else (SUB // 2 if BITS == 4 else SUB)   # per sub-tile
    SV: tl.constexpr = STORED // VEC                                     # vectors of them per sub-tile
    rg = tl.arange(0, NG)
    cols = (rg[:, None, None] * SV + tl.arange(0, SV)[None, :, None]) * VEC + tl.arange(0, VEC)[None, None, :]
    if HALF:
        w_ptrs = (w_ptr + rn[:, None, None, None] * stride_wn).to(tl.pointer_type(tl.int32)) + cols[None]
    else:
        w_ptrs = w_ptr + rn[:, None, None, None] * stride_wn + cols[None]
    x_row = x_ptr + row * stride_xm
    if X_PER_ROW:
        x_row += 0 * rn[:, None, None, None]          # x tiles come out [BN, NG, SV, VEC], like the weights
    acc = tl.zeros((BLOCK_N, NG, SV, VEC), dtype=tl.float32)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if PREFETCH:
        w = _fma_weights(w_ptrs, k_begin, k_end, cols, n_mask, BITS, HALF)      # weights never change: no wait
        await_previous(PDL)
        xa, xb = _fma_x(x_ptr, x_row, k_begin, k_end, cols, BITS, HALF)
    else:
        await_previous(PDL)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if PREFETCH:                                   # the next tile's loads fly while this one computes
            w_next = _fma_weights(w_ptrs, k0 + BLOCK_K, k_end, cols, n_mask, BITS, HALF)
            xa_next, xb_next = _fma_x(x_ptr, x_row, k0 + BLOCK_K, k_end, cols, BITS, HALF)
        else:
            w = _fma_weights(w_ptrs, k0, k_end, cols, n_mask, BITS, HALF)
            xa, xb = _fma_x(x_ptr, x_row, k0, k_end, cols, BITS, HALF)
        if HALF and BITS == 8:
            prod = int8_half_dot(w, tl.broadcast_to(_rows(xa, X_PER_ROW), w.shape),
                                 tl.broadcast_to(_rows(xb, X_PER_ROW), w.shape), ASM)
        elif HALF:
            x0, x1 = _rows(xa.to(tl.int32), X_PER_ROW), _rows((xa >> 32).to(tl.int32), X_PER_ROW)
            x2, x3 = _rows(xb.to(tl.int32), X_PER_ROW), _rows((xb >> 32).to(tl.int32), X_PER_ROW)
            prod = int4_half_dot(w, tl.broadcast_to(x0, w.shape), tl.broadcast_to(x1, w.shape),
                                  tl.broadcast_to(x2, w.shape), tl.broadcast_to(x3, w.shape), ASM)
        elif BITS == 4:      # byte j: low nibble pairs with x[2j], high with x[2j + 1]; w = 16 (f - 1.5) s
            packed = w.to(tl.int32)
            x_even, x_odd = _rows(xa.to(tl.float32), X_PER_ROW), _rows(xb.to(tl.float32), X_PER_ROW)
            prod = one_plus_sixteenth(packed) * x_even + one_plus_sixteenth(packed >> 4) * x_odd \
                - 1.5 * (x_even + x_odd)
        else:
            prod = (s8_to_f32(w) if BITS == 8 else w.to(tl.float32)) * _rows(xa.to(tl.float32), X_PER_ROW)
        if BITS < 16 and not PER_ROW_SCALE:
            group = (k0 + rg * SUB) // group_size
            scale = tl.load(s_ptr + rn[:, None] * stride_sn + group[None, :],
                            mask=n_mask[:, None] & (k0 + rg * SUB < K)[None, :], other=0.0)
            prod = prod * scale.to(tl.float32)[:, :, None, None]
        acc += prod
        if PREFETCH:
            w, xa, xb = w_next, xa_next, xb_next
    out = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)[None, :]    # [1, BN]
    if BITS == 4:
        out *= 16.0
    elif HALF:
        out *= 128.0
    if PER_ROW_SCALE:
        out *= tl.load(s_ptr + rn * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    rm = row + tl.arange(0, 1)
    if EPILOGUE:
        out = _epilogue(out, rm, rn, M, N, b_ptr, r_ptr, stride_rm, HAS_BIAS, ACT, HAS_RESIDUAL)
    offsets = pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=n_mask[None, :])


@triton.jit
def _split_k_reduce_kernel(ws_ptr, b_ptr, r_ptr, out_ptr, M, N, stride_rm, SPLIT_K: tl.constexpr,
                           HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """Sum the fp32 partials [SPLIT_K, M, N] in order, then the epilogue."""
    await_previous(PDL)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * N + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    acc = _epilogue(acc, rm, rn, M, N, b_ptr, r_ptr, stride_rm, HAS_BIAS, ACT, HAS_RESIDUAL)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


NUM_SMS = 132          # H100 SXM; shapes only the heuristic split, never correctness
L2_CHUNK = 2048        # bytes per bulk prefetch; a program of 4 warps asks for 256 KB


def _l2_prefetch_bytes(weight: torch.Tensor, bits: int) -> int:
    """How much of `weight` a CUDA-core product launched with PDL asks the L2 for before its wait: the
    first RAYSPEED_L2_PREFETCH_MB (whole chunks), which its first programs then read from L2 (the
    kernel before a product, a norm or decode attention of a few programs, leaves HBM idle while it
    runs, and the product's first wave is resident by then). Measured at GPT-Neo 2.7B batch 1 on an
    H100 (bench/results/*-l2-*.json): 4 MB took fp16 from 2.40 to 2.35-2.37 ms a step and int8 from
    1.79-1.81 to 1.75-1.77, and cost int4 2-4 % (its products are a quarter the size, so 4 MB is a
    large share of each); 8 MB and more lost everywhere. So 4 MB but for int4, which gets none."""
    if not weight.is_contiguous() or weight.data_ptr() % 16:
        return 0
    cap = float(os.environ.get("RAYSPEED_L2_PREFETCH_MB", "0" if bits == 4 else "4"))
    nbytes = min(int(cap * 2**20), weight.numel() * weight.element_size())
    return nbytes // L2_CHUNK * L2_CHUNK


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick_tile(m: int, n: int, k: int, bits: int, group_size: int) -> Tile:
    """Untuned default: 16-row tiles (more for prefill), K split until there are ~4 programs per SM."""
    block_m = 16 if m <= 16 else min(64, triton.next_power_of_2(m))
    block_n, block_k = 64, 128
    if group_size < k:                                   # a tile must lie inside one scale group
        block_k = min(block_k, group_size & -group_size)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k = 1
    while tiles * split_k < 4 * NUM_SMS and k // (block_k * split_k * 2) >= 4 and split_k < 16:
        split_k *= 2
    return Tile(block_m, block_n, block_k, split_k)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  scales: torch.Tensor | None = None, bits: int = 16, group_size: int | None = None,
                  tile: Tile | None = None, activation: str | None = None,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(x [..., K] @ dequantized(weight)^T + bias) + residual, in x's dtype; `activation` one of
    `ACTIVATION_CODES`, `residual` shaped like the output. `tile`: default the untuned `pick_tile`
    (kernels/gemv_tuner.py's `streamed_linear` runs the tuner's choice)."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if bits == 4 and (rows.data_ptr() % 4 or rows.stride(0) % 2):
        rows = rows.clone()                                # 16-bit x pairs are read as 32-bit words
    elif bits == 8 and tile is not None and tile.half and (rows.data_ptr() % 8 or rows.stride(0) % 4):
        rows = rows.clone()                                # and int8 half tiles' x quads as 64-bit words
    m, n = rows.shape[0], weight.shape[0]
    expect = k // 2 if bits == 4 else k
    assert weight.shape[1] == expect and weight.stride(1) == 1, \
        f"weight {tuple(weight.shape)} does not fit K={k} at {bits} bits"
    group_size = group_size or k
    if bits < 16:
        assert scales is not None and scales.shape == (n, triton.cdiv(k, group_size)), \
            f"scales {None if scales is None else tuple(scales.shape)} != ({n}, {triton.cdiv(k, group_size)})"
    tile = tile or pick_tile(m, n, k, bits, group_size)
    per_row = bits < 16 and group_size >= k and not tile.scale_in_tile
    if bits < 16 and not per_row and not tile.scale_in_tile and not tile.fma:
        assert group_size % tile.block_k == 0, f"block_k={tile.block_k} must divide group_size={group_size}"
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if residual is not None:
        assert residual.shape == out.shape, f"residual {tuple(residual.shape)} != output {tuple(out.shape)}"
        residual = residual.reshape(m, n)
        assert residual.stride(-1) == 1, "residual must be contiguous in its last dimension"
    if m == 0:
        return out
    k_per_split = triton.cdiv(triton.cdiv(k, tile.split_k), tile.block_k) * tile.block_k
    split = triton.cdiv(k, k_per_split)
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, tile.block_n), split, triton.cdiv(m, tile.block_m))
    epilogue = dict(HAS_BIAS=bias is not None, ACT=ACTIVATION_CODES[activation], HAS_RESIDUAL=residual is not None)
    dummy = weight                                     # for pointers a flag leaves unread
    bias_, residual_ = dummy if bias is None else bias, dummy if residual is None else residual
    res_stride = 0 if residual is None else residual.stride(0)
    pdl = (tile.fma or tile.swap) and programmatic_launch(x)     # not `_skinny_kernel`'s tiles (see there)
    flags = dict(BITS=bits, EPILOGUE=split == 1, **epilogue, PER_ROW_SCALE=per_row,
                 BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
                 num_warps=tile.num_warps, num_stages=tile.num_stages)
    args = (rows, weight, dummy if scales is None else scales, bias_, residual_, target, m, n, k,
            rows.stride(0), weight.stride(0), 0 if scales is None else scales.stride(0), res_stride, n, m * n,
            group_size, k_per_split)
    l2_bytes = _l2_prefetch_bytes(weight, bits) if pdl else 0
    if tile.fma:
        grouped = bits < 16 and not per_row
        sub = min(tile.block_k, group_size) if grouped else tile.block_k
        assert not grouped or (tile.block_k % sub == 0 and group_size % sub == 0), \
            f"block_k={tile.block_k} and group_size={group_size}: one must divide the other"
        assert sub % 8 == 0, f"the CUDA-core kernel needs K tiles of multiples of 8 values, got {sub}"
        if tile.half:
            assert bits in (4, 8) and x.dtype == torch.float16, \
                f"half tiles take int4 or int8 weights and fp16 x, got {bits} bits and {x.dtype}"
            vector = 32 if bits == 4 else 16                # columns per 16 bytes of weights
            aligned = weight.stride(0) % 16 == 0 and weight.data_ptr() % 16 == 0
            assert k % vector == 0 and sub % vector == 0 and aligned, \
                f"half tiles read weights in 16-byte vectors of {vector} columns: K={k}, K tiles of {sub} do not fit"
        flags.pop("BLOCK_M")
        _fma_kernel[(grid[0], split, m)](*args, l2_bytes, SUB=sub, PREFETCH=tile.prefetch, PDL=pdl,
                                         launch_pdl=pdl, HALF=tile.half, ASM=tile.half and not _interpreting(),
                                         X_PER_ROW=tile.x_per_row, L2_LANES=32 * tile.num_warps if l2_bytes else 0,
                                         L2_CHUNK=L2_CHUNK, **flags)
    elif tile.swap:
        assert bits in (16, 8) and not tile.scale_in_tile, f"swapped tiles take 16-bit or int8 weights, not {bits} bits"
        assert per_row or bits == 16 or group_size % tile.block_k == 0, \
            f"block_k={tile.block_k} must divide group_size={group_size}"
        row_bytes = k * bits // 8
        aligned = weight.data_ptr() % 16 == 0 and (weight.stride(0) * bits // 8) % 16 == 0 and row_bytes % 16 == 0
        l2_rows = min(tile.l2_rows, row_bytes) // 16 * 16 if pdl and aligned and not _interpreting() else 0
        _swap_kernel[grid](*args, PDL=pdl, launch_pdl=pdl, L2_ROWS=l2_rows, **flags)
    else:
        _skinny_kernel[grid](*args, SCALE_IN_TILE=bits < 16 and tile.scale_in_tile, **flags)
    if split > 1:
        block_m, block_n = min(16, triton.next_power_of_2(m)), 256
        _split_k_reduce_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m))](
            target, bias_, residual_, out, m, n, res_stride, SPLIT_K=split, **epilogue,
            BLOCK_M=block_m, BLOCK_N=block_n, PDL=pdl, launch_pdl=pdl)
    return out
