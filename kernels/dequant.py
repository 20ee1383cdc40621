"""Quantized weights dequantized once into a float copy, for products of many rows (prefill, and
int4 decode past the tuned batch sizes), where cuBLAS on that copy beats kernels/gemv.py's kernels
that dequantize in registers. Formats as in kernels/quant.py."""
import torch
import triton
import triton.language as tl

from kernels.unpack import s8_to_f32, u4_to_f32


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, group_size,
                       BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr):
    """out [N, K] = q * scale in out's dtype, in [BN, BK // SUB, SUB] tiles as in kernels/gemv_fma.py's `_fma_kernel`
    (SUB values share a scale); at 4 bits each byte's two values are interleaved back in registers."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    k0 = tl.program_id(1) * BLOCK_K
    NG: tl.constexpr = BLOCK_K // SUB
    SW: tl.constexpr = SUB // 2 if BITS == 4 else SUB                 # stored columns per sub-tile
    rg = tl.arange(0, NG)
    cols = rg[:, None] * SW + tl.arange(0, SW)[None, :]                # [NG, SW] stored column in the tile
    if BITS == 4:
        cols += k0 // 2
        w_mask = n_mask[:, None, None] & (cols < K // 2)[None, :, :]
    else:
        cols += k0
        w_mask = n_mask[:, None, None] & (cols < K)[None, :, :]
    w = tl.load(w_ptr + rn[:, None, None] * stride_wn + cols[None, :, :], mask=w_mask, other=0)
    group = (k0 + rg * SUB) // group_size
    scale = tl.load(s_ptr + rn[:, None] * stride_sn + group[None, :],
                    mask=n_mask[:, None] & (k0 + rg * SUB < K)[None, :], other=0.0).to(tl.float32)[:, :, None]
    if BITS == 4:
        packed = w.to(tl.int32)
        values = tl.reshape(tl.join(u4_to_f32(packed & 0xF) * scale, u4_to_f32(packed >> 4) * scale),
                            (BLOCK_N, NG, SUB))
        k = k0 + rg[:, None] * SUB + tl.arange(0, SUB)[None, :]
    else:
        values = s8_to_f32(w) * scale
        k = cols
    tl.store(out_ptr + rn[:, None, None] * K + k[None, :, :], values.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None, None] & (k < K)[None, :, :])


# Rows from which a quantized product runs faster as dequantize-to-float + cuBLAS than with the
# weight dequantized in registers: prefill, and int4 decode batches past the tuned sizes.
DEQUANT_MIN_ROWS = {4: 17, 8: 129}


def dequantize_weight(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """A fresh float [N, K] copy of a quantized weight, for one large-M product: the caching
    allocator (or a CUDA graph's pool) hands the same memory to the next layer's copy, so at most
    one such copy lives at a time."""
    n, k = weight.shape[0], weight.shape[1] * (2 if bits == 4 else 1)
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    group_size = group_size or k
    block_n, block_k = 8, 512
    sub = min(block_k, group_size & -group_size)        # a power of two inside one scale group
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        weight, scales, out, n, k, weight.stride(0), scales.stride(0), group_size, BITS=bits,
        BLOCK_N=block_n, BLOCK_K=block_k, SUB=sub)
    return out
