"""Weight-streaming matmul for few rows: y = x W^T (+ bias) with W in fp16/bf16, int8 or packed int4.

Decode multiplies a handful of token rows by every weight of the model once per step, so its speed
is the rate at which the weights stream from HBM. Three kernels cover the three weight formats of
`kernels.quant` and dequantize in registers (no full-precision copy of a quantized weight exists
for a decode product), bias, activation and residual fused:
- `_fma_kernel` (kernels/gemv_fma.py), one row per program on the CUDA cores: the weight goes from
  HBM straight to registers; the fastest at one or two rows (bench/results/*-gemv-fma.json); int4
  and int8 weights against fp16 x also in packed fp16 arithmetic (`half` tiles);
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

This module holds the tensor-core kernels, the tiles and the launcher (`skinny_linear`); the
shared epilogue is kernels/gemv_epilogue.py.

Formats (see kernels/quant.py): bits=16 `weight [N, K]`; bits=8 `qweight int8 [N, K]`; bits=4
`qweight uint8 [N, K // 2]`, column 2j in the low nibble and 2j+1 in the high, value nibble - 8;
`scales [N, K // group_size]`, w = q * scales[n, k // group_size].
"""
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.gemv_epilogue import ACTIVATION_CODES, epilogue, feature_params
from kernels.gemv_fma import _fma_kernel
from kernels.gemv_rows import _rows_kernel
from kernels.pdl import await_previous, prefetch_rows_l2
from kernels.pdl import enabled as programmatic_launch
from kernels.unpack import nibble_minus_8, s8_to


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
    prefetch: bool = False         # fma, rows: load the next K tile before multiplying this one
    half: bool = False             # fma, int4 weights, fp16 x: packed fp16 arithmetic (`int4_half_dot`)
    x_per_row: bool = False        # fma: every thread loads the x of its own weights (see `_fma_kernel`)
    swap: bool = False             # `_swap_kernel` (weight rows on the MMA's long side; 16/8 bits) instead
    l2_rows: int = 0               # swap, rows: bytes of each weight row a program asks the L2 for before its PDL wait
    rows: bool = False             # `_rows_kernel` (kernels/gemv_rows.py) instead: each thread owns all block_n rows

    @property
    def takes_norm(self) -> bool:
        """Whether the product can do the norm before it (`NormFold`): `rows` tiles of one K split."""
        return self.rows and self.split_k == 1


@dataclass(frozen=True)
class NormFold:
    """The LayerNorm or RMSNorm before a product, done inside it (kernels/gemv_rows.py, NORM): its
    weight g ([K], x's dtype; None where the product's weight holds it already, W g), c1 = W g (fp32
    [N], LayerNorm only: the mean's share) and eps. The product is then W norm(x) + bias with the
    caller's bias holding the norm's, W b_norm."""
    weight: torch.Tensor | None
    c1: torch.Tensor | None
    eps: float


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
        acc *= feature_params(s_ptr, rn, stride_sn, N, True, 0.0)[None, :]
    if EPILOGUE:                                       # without split-K; the reduction applies it otherwise
        bias = feature_params(b_ptr, rn, 1, N, HAS_BIAS, 0.0)
        acc = epilogue(acc, rm, rn, M, N, bias, r_ptr, stride_rm, HAS_BIAS, ACT, HAS_RESIDUAL)
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
    bias = feature_params(b_ptr, rn, 1, N, HAS_BIAS and EPILOGUE, 0.0)
    row_scale = feature_params(s_ptr, rn, stride_sn, N, PER_ROW_SCALE, 1.0)
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
        acc *= row_scale[:, None]
    acc = tl.trans(acc)                                # [BM, BN]
    if EPILOGUE:
        acc = epilogue(acc, rm, rn, M, N, bias, r_ptr, stride_rm, HAS_BIAS, ACT, HAS_RESIDUAL)
    out_mask = (rm[:, None] < M) & n_mask[None, :]
    offsets = pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _split_k_reduce_kernel(ws_ptr, b_ptr, r_ptr, out_ptr, M, N, stride_rm, SPLIT_K: tl.constexpr,
                           HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """Sum the fp32 partials [SPLIT_K, M, N] in order, then the epilogue."""
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    bias = feature_params(b_ptr, rn, 1, N, HAS_BIAS, 0.0)
    await_previous(PDL)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * N + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    acc = epilogue(acc, rm, rn, M, N, bias, r_ptr, stride_rm, HAS_BIAS, ACT, HAS_RESIDUAL)
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
    large share of each); 8 MB and more lost everywhere. So 4 MB but for int4, which gets none. The
    `rows` tiles make the same request: int8 at batch 1 with its rows tiles 1.561-1.565 -> 1.534-1.535
    ms (bench/results/*-int8-rows-l2head*.json)."""
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
                  residual: torch.Tensor | None = None, norm: NormFold | None = None) -> torch.Tensor:
    """act(x [..., K] @ dequantized(weight)^T + bias) + residual, in x's dtype; `activation` one of
    `ACTIVATION_CODES`, `residual` shaped like the output. `tile`: default the untuned `pick_tile`
    (kernels/gemv_tuner.py's `streamed_linear` runs the tuner's choice). With `norm`, x is normalised
    first, inside the product (a tile that `takes_norm`)."""
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
    if norm is not None:
        if not tile.takes_norm:
            raise ValueError(f"only rows tiles of one K split take the norm before them, not {tile}")
        assert norm.weight is None or (norm.weight.shape == (k,) and norm.weight.dtype == x.dtype
                                       and norm.weight.is_contiguous() and norm.weight.data_ptr() % 16 == 0), \
            f"norm weight must be [{k}] {x.dtype}, aligned, got {tuple(norm.weight.shape)} {norm.weight.dtype}"
        assert norm.c1 is None or (norm.c1.shape == (n,) and norm.c1.dtype == torch.float32), f"c1 must be [{n}] fp32"
    per_row = bits < 16 and group_size >= k and not tile.scale_in_tile
    if bits < 16 and not per_row and not tile.scale_in_tile and not (tile.fma or tile.rows):
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
    pdl = (tile.fma or tile.rows or tile.swap) and programmatic_launch(x)     # not `_skinny_kernel`'s tiles (see there)
    flags = dict(BITS=bits, EPILOGUE=split == 1, **epilogue, PER_ROW_SCALE=per_row,
                 BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
                 num_warps=tile.num_warps, num_stages=tile.num_stages)
    args = (rows, weight, dummy if scales is None else scales, bias_, residual_, target, m, n, k,
            rows.stride(0), weight.stride(0), 0 if scales is None else scales.stride(0), res_stride, n, m * n,
            group_size, k_per_split)
    l2_bytes = _l2_prefetch_bytes(weight, bits) if pdl else 0
    if tile.fma or tile.rows:
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
        if tile.rows:
            assert tile.block_n in (1, 2, 4, 8), f"rows tiles own 1, 2, 4 or 8 rows a thread, not {tile.block_n}"
            flags.pop("BLOCK_N")
            aligned = weight.data_ptr() % 16 == 0 and (weight.stride(0) * bits // 8) % 16 == 0
            l2_row_bytes = tile.l2_rows // 16 * 16 if pdl and aligned and not _interpreting() else 0
            norm_args = (dummy, dummy, 0.0) if norm is None else \
                (dummy if norm.weight is None else norm.weight, dummy if norm.c1 is None else norm.c1, norm.eps)
            norm_kind = 0 if norm is None else 2 if norm.c1 is None else 1
            _rows_kernel[(grid[0], split, m)](*args, l2_row_bytes, l2_bytes, *norm_args, NORM=norm_kind,
                                              NORM_WEIGHT=norm is None or norm.weight is not None,
                                              ROWS=tile.block_n, SUB=sub, PDL=pdl,
                                              launch_pdl=pdl, HALF=tile.half, ASM=tile.half and not _interpreting(),
                                              L2=l2_row_bytes > 0, PREFETCH=tile.prefetch,
                                              L2_LANES=32 * tile.num_warps if l2_bytes else 0, L2_CHUNK=L2_CHUNK,
                                              **flags)
        else:
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
