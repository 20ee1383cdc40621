"""The CUDA-core kernel of the weight-streaming matmul with each thread owning ROWS weight rows
(kernels/gemv.py launches it for `Tile(rows=...)`): one row of x per program, the program's K slice
spread over its threads, each thread multiplying the same x values into the weights of ROWS output
features.

`_fma_kernel` (kernels/gemv_fma.py) works on [BLOCK_N, ...] tiles whose thread layout Triton picks;
its x values are either exchanged through shared memory every K step (the Triton 3.6 build) or
loaded once per weight element (`x_per_row`). Under Nsight Compute on an H100
(bench/results/NVIDIA-H100-80GB-HBM3-2026-11-26-ncu-gemv.json) GPT-Neo's one-row int4 QKV product
issued 336,000 warp loads for 19,200 warp loads' worth of weights, and every format ran 3.5 (fp16)
to 13 (int4) instructions per weight byte. Here every row is its own [NG, SV, VEC] tile in exactly
x's shape, so x and the weights share a layout by construction: x is loaded, converted (and, at
4 bits, paired) once per K step and reused by the ROWS rows, and nothing crosses threads until the
one reduction per row after the loop. ROWS (1, 2, 4 or 8) is unrolled by hand: Triton carries no
lists through a loop.

Measured on the H100 (docs/performance.md, r17): three of GPT-Neo's four int8 one-row products
went from 1.67-1.97 to 2.15-2.24 TB/s and its int8 batch-1 step from 1.745 to 1.567 ms (paired;
1.535 with the weight's head asked of L2 before the wait, as below);
int4's products 4-14 % faster in the tuner's clock, its step 1.66 -> 1.65 ms; fp16's within 3 %
(not shipped). The tuner offers these tiles for one and two rows.

Tiles: weights as stored, VEC elements a vector (8 fp16 / int8, 4 packed int4 bytes; with HALF 4
32-bit words), SV vectors per scale sub-tile of SUB columns, NG sub-tiles per BLOCK_K."""
import triton
import triton.language as tl

from kernels.gemv_epilogue import epilogue, feature_params, residual_tile
from kernels.gemv_fma import _fma_x, _two_words
from kernels.pdl import await_previous, prefetch_l2, prefetch_rows_l2
from kernels.unpack import high_half, int4_half_dot, int8_half_dot, low_half, one_plus_sixteenth, s8_to_f32


@triton.jit
def _row_tile(w_ptr, s_ptr, row, N, K, stride_wn, stride_sn, group_size, k0, k_end, cols, rg, BITS: tl.constexpr,
              HALF: tl.constexpr, VEC: tl.constexpr, GROUPED: tl.constexpr, SUB: tl.constexpr):
    """Weight row `row`'s stored values at K offset k0, [NG, SV, VEC] (32-bit words with HALF), and
    their fp32 [NG] group scales (with GROUPED; else ones, nothing read): loaded together, as a
    scale read after the arithmetic would put a second memory round trip on each K step. Nothing at
    or past k_end, or for rows at or past N (those read as zeros)."""
    ok = row + 0 * cols < N                       # as a tile: the interpreter masks with no scalar
    base = w_ptr + row.to(tl.int64) * stride_wn
    if HALF:                                      # words of 8 nibbles or 4 int8
        per_word: tl.constexpr = 8 if BITS == 4 else 4
        start, end = tl.multiple_of(k0 // per_word, VEC), tl.multiple_of(k_end // per_word, VEC)   # whole vectors
        w = tl.load(base.to(tl.pointer_type(tl.int32)) + start + cols, mask=ok & (start + cols < end),
                    other=-0x77777778 if BITS == 4 else 0)
    elif BITS == 4:
        w = tl.load(base + k0 // 2 + cols, mask=ok & (k0 // 2 + cols < k_end // 2), other=0x88)
    else:
        w = tl.load(base + k0 + cols, mask=ok & (k0 + cols < k_end), other=0)
    scale = tl.full(rg.shape, 1.0, tl.float32)
    if GROUPED:
        group = (k0 + rg * SUB) // group_size
        in_k = (row + 0 * rg < N) & (k0 + rg * SUB < K)
        scale = tl.load(s_ptr + row * stride_sn + group, mask=in_k, other=0.0).to(tl.float32)
    return w, scale


@triton.jit
def _row_tiles(w_ptr, s_ptr, n0, N, K, stride_wn, stride_sn, group_size, k0, k_end, cols, rg, ROWS: tl.constexpr,
               BITS: tl.constexpr, HALF: tl.constexpr, VEC: tl.constexpr, GROUPED: tl.constexpr, SUB: tl.constexpr):
    """`_row_tile` of rows n0 .. n0 + ROWS - 1 at k0: eight weight tiles, then their eight scales
    (rows past ROWS repeat row n0 and are never used)."""
    w0, s0 = _row_tile(w_ptr, s_ptr, n0, N, K, stride_wn, stride_sn, group_size, k0, k_end, cols, rg, BITS, HALF,
                       VEC, GROUPED, SUB)
    w1, w2, w3, w4, w5, w6, w7 = w0, w0, w0, w0, w0, w0, w0
    s1, s2, s3, s4, s5, s6, s7 = s0, s0, s0, s0, s0, s0, s0
    if ROWS > 1:
        w1, s1 = _row_tile(w_ptr, s_ptr, n0 + 1, N, K, stride_wn, stride_sn, group_size, k0, k_end, cols, rg, BITS,
                           HALF, VEC, GROUPED, SUB)
    if ROWS > 2:
        w2, s2 = _row_tile(w_ptr, s_ptr, n0 + 2, N, K, stride_wn, stride_sn, group_size, k0, k_end, cols, rg, BITS,
                           HALF, VEC, GROUPED, SUB)
        w3, s3 = _row_tile(w_ptr, s_ptr, n0 + 3, N, K, stride_wn, stride_sn, group_size, k0, k_end, cols, rg, BITS,
                           HALF, VEC, GROUPED, SUB)
    if ROWS > 4:
        w4, s4 = _row_tile(w_ptr, s_ptr, n0 + 4, N, K, stride_wn, stride_sn, group_size, k0, k_end, cols, rg, BITS,
                           HALF, VEC, GROUPED, SUB)
        w5, s5 = _row_tile(w_ptr, s_ptr, n0 + 5, N, K, stride_wn, stride_sn, group_size, k0, k_end, cols, rg, BITS,
                           HALF, VEC, GROUPED, SUB)
        w6, s6 = _row_tile(w_ptr, s_ptr, n0 + 6, N, K, stride_wn, stride_sn, group_size, k0, k_end, cols, rg, BITS,
                           HALF, VEC, GROUPED, SUB)
        w7, s7 = _row_tile(w_ptr, s_ptr, n0 + 7, N, K, stride_wn, stride_sn, group_size, k0, k_end, cols, rg, BITS,
                           HALF, VEC, GROUPED, SUB)
    return w0, w1, w2, w3, w4, w5, w6, w7, s0, s1, s2, s3, s4, s5, s6, s7


@triton.jit
def _row_sums(w, scale, xa, xb, x0, x1, x2, x3, BITS: tl.constexpr, HALF: tl.constexpr, ASM: tl.constexpr,
              GROUPED: tl.constexpr):
    """A row's K tile `w` times this tile's x, summed over each vector: fp32 [NG, SV], times the
    group scales `scale` [NG] if GROUPED (a per-row scale and the fixed factors of the 4-bit and
    packed paths are the caller's)."""
    if HALF and BITS == 4:
        prod = int4_half_dot(w, x0, x1, x2, x3, ASM)
    elif HALF:
        prod = int8_half_dot(w, xa, xb, ASM)
    elif BITS == 4:                               # byte j: low nibble pairs with x[2j], high with x[2j + 1]
        w = w.to(tl.int32)
        prod = one_plus_sixteenth(w) * xa + one_plus_sixteenth(w >> 4) * xb - 1.5 * (xa + xb)
    elif BITS == 8:
        prod = s8_to_f32(w) * xa
    else:
        prod = w.to(tl.float32) * xa
    sums = tl.sum(prod, axis=2)
    if GROUPED:
        sums = sums * scale[:, None]
    return sums


@triton.jit
def _norm_word(w, g, ASM: tl.constexpr, WEIGHT: tl.constexpr = True):
    """One 32-bit word of two fp16 x values and the word of their norm weights: (the word of x * g,
    rounded to fp16 as `mul.rn.f16x2` rounds, the two x values' sum and their sum of squares in fp32).
    Without WEIGHT (g already in the product's weight), the word of x itself."""
    if ASM:
        sums = tl.inline_asm_elementwise(
            """{
            .reg .f16 lo, hi;
            .reg .f32 flo, fhi;
            mov.b32 {lo, hi}, $2;
            cvt.f32.f16 flo, lo;
            cvt.f32.f16 fhi, hi;
            add.f32 $0, flo, fhi;
            mul.f32 $1, flo, flo;
            fma.rn.f32 $1, fhi, fhi, $1;
            }""",
            "=f,=f,r", [w], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
        if WEIGHT:
            w = tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [w, g], dtype=tl.int32,
                                          is_pure=True, pack=1)
        return w, sums[0], sums[1]
    lo, hi = low_half(w, tl.float16).to(tl.float32), high_half(w, tl.float16).to(tl.float32)
    if WEIGHT:
        plo = (lo * low_half(g, tl.float16).to(tl.float32)).to(tl.float16).to(tl.int16, bitcast=True)
        phi = (hi * high_half(g, tl.float16).to(tl.float32)).to(tl.float16).to(tl.int16, bitcast=True)
        w = (plo.to(tl.int32) & 0xFFFF) | (phi.to(tl.int32) << 16)
    return w, lo + hi, lo * lo + hi * hi


@triton.jit
def _norm_x(xa, xb, ga, gb, BITS: tl.constexpr, HALF: tl.constexpr, ASM: tl.constexpr, WEIGHT: tl.constexpr = True):
    """This K tile's x (as `_fma_x` loads it) times the norm weights g (loaded the same way), and
    the fp32 sum and sum of squares of the x values, [NG, SV]. Packed words (HALF) multiply in fp16
    as the norm kernel's output would be rounded; float x (else) in fp32. Without WEIGHT, x as it is
    (g is in the product's weight; ga, gb unused)."""
    if HALF and BITS == 8:                             # two words of two fp16 each
        xa, s1, s2 = _norm_word(xa, ga, ASM, WEIGHT)
        xb, t1, t2 = _norm_word(xb, gb, ASM, WEIGHT)
        s1, s2 = s1 + t1, s2 + t2
    elif HALF:                                         # two 64-bit words of two words each
        a0, s1, s2 = _norm_word(xa.to(tl.int32), ga.to(tl.int32), ASM, WEIGHT)
        a1, t1, t2 = _norm_word((xa >> 32).to(tl.int32), (ga >> 32).to(tl.int32), ASM, WEIGHT)
        s1, s2 = s1 + t1, s2 + t2
        b0, t1, t2 = _norm_word(xb.to(tl.int32), gb.to(tl.int32), ASM, WEIGHT)
        s1, s2 = s1 + t1, s2 + t2
        b1, t1, t2 = _norm_word((xb >> 32).to(tl.int32), (gb >> 32).to(tl.int32), ASM, WEIGHT)
        s1, s2 = s1 + t1, s2 + t2
        xa, xb = _two_words(a0, a1), _two_words(b0, b1)
    elif BITS == 4:                                    # float x pairs
        fa, fb = xa.to(tl.float32), xb.to(tl.float32)
        s1, s2 = fa + fb, fa * fa + fb * fb
        if WEIGHT:
            xa, xb = (fa * ga.to(tl.float32)).to(xa.dtype), (fb * gb.to(tl.float32)).to(xb.dtype)
    else:                                              # xa is xb: one x per weight column
        fa = xa.to(tl.float32)
        s1, s2 = fa, fa * fa
        if WEIGHT:
            xa = (fa * ga.to(tl.float32)).to(xa.dtype)
        xb = xa
    return xa, xb, tl.sum(s1, axis=2), tl.sum(s2, axis=2)


@triton.jit
def _rows_kernel(x_ptr, w_ptr, s_ptr, b_ptr, r_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                 stride_rm, stride_om, stride_os, group_size, k_per_split, l2_row_bytes, l2_head_bytes,
                 g_ptr, c1_ptr, eps, BITS: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 ACT: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, PER_ROW_SCALE: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_K: tl.constexpr, SUB: tl.constexpr, PDL: tl.constexpr, HALF: tl.constexpr,
                 ASM: tl.constexpr, L2: tl.constexpr, PREFETCH: tl.constexpr, L2_LANES: tl.constexpr = 0,
                 L2_CHUNK: tl.constexpr = 2048, NORM: tl.constexpr = 0, NORM_WEIGHT: tl.constexpr = True):
    """out[row, n] for the ROWS features n of program (pid_n, pid_k) and x row `row`; with several K
    splits, fp32 partial sums into out[pid_k] (kernels/gemv.py adds them up in order). PREFETCH
    issues the next K tile's loads before this tile's arithmetic (and the first before the PDL
    wait): with a thread's ROWS rows of weights per tile twice in registers, a program keeps a
    tile in flight while it computes. With L2, the program first asks the L2 for up to
    `l2_row_bytes` of each of its rows' K slice (one bulk prefetch a row, before the PDL wait), so
    its whole share of the weight is on the way at once; the loop's loads, issued one K tile at a
    time, then find it there. With L2_LANES, as in `_fma_kernel`, the first programs of x row 0 ask
    the L2 for the weight's first `l2_head_bytes`, L2_LANES * L2_CHUNK bytes each, before the wait
    (`kernels.gemv._l2_prefetch_bytes`).

    NORM (1 LayerNorm, 2 RMSNorm; one K split only): x is the residual stream before the norm that
    feeds this product, whose weight `g` multiplies x as it loads; the loop also sums x and its
    squares, and after it out = rstd * (out - mean * c1) with c1[n] = sum_k W[n, k] g[k] (mean 0 for
    RMSNorm): the normalised product without a norm kernel before it. The norm's bias, W b_norm, is
    in the caller's bias. Without NORM_WEIGHT, g is already in W (x is not multiplied)."""
    pid_n, pid_k, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if L2_LANES:
        first = (pid_n + pid_k * tl.num_programs(0)).to(tl.int64) * (L2_LANES * L2_CHUNK)
        if (row == 0) & (first < l2_head_bytes):
            prefetch_l2(w_ptr, first, l2_head_bytes, L2_LANES, L2_CHUNK)
    NG: tl.constexpr = BLOCK_K // SUB
    VEC: tl.constexpr = 4 if BITS == 4 or HALF else 8
    STORED: tl.constexpr = SUB // (8 if BITS == 4 else 4) if HALF else (SUB // 2 if BITS == 4 else SUB)
    SV: tl.constexpr = STORED // VEC
    rg = tl.arange(0, NG)
    cols = (rg[:, None, None] * SV + tl.arange(0, SV)[None, :, None]) * VEC + tl.arange(0, VEC)[None, None, :]
    n0 = pid_n * ROWS
    rn = n0 + tl.arange(0, ROWS)
    bias = feature_params(b_ptr, rn, 1, N, HAS_BIAS and EPILOGUE, 0.0)      # parameters: before the wait
    row_scale = feature_params(s_ptr, rn, stride_sn, N, PER_ROW_SCALE, 1.0)
    c1 = feature_params(c1_ptr, rn, 1, N, NORM == 1, 0.0)
    x_row = x_ptr + row * stride_xm
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if L2:
        rows = tl.minimum(rn, N - 1).to(tl.int64)
        starts = w_ptr + rows * stride_wn + (k_begin // 2 if BITS == 4 else k_begin)
        slice_bytes = (k_end - k_begin) * BITS // 8 // 16 * 16
        prefetch_rows_l2(starts.to(tl.pointer_type(tl.int8)), tl.minimum(l2_row_bytes, slice_bytes))
    acc0 = tl.zeros((NG, SV), dtype=tl.float32)
    acc1, acc2, acc3, acc4, acc5, acc6, acc7 = acc0, acc0, acc0, acc0, acc0, acc0, acc0
    GROUPED: tl.constexpr = BITS < 16 and not PER_ROW_SCALE
    x_sum = tl.zeros((NG, SV), dtype=tl.float32)
    x_squares = x_sum
    if PREFETCH:                                  # weights never change: the first tile before the wait
        w0, w1, w2, w3, w4, w5, w6, w7, s0, s1, s2, s3, s4, s5, s6, s7 = _row_tiles(
            w_ptr, s_ptr, n0, N, K, stride_wn, stride_sn, group_size, k_begin, k_end, cols, rg, ROWS, BITS, HALF, VEC,
            GROUPED, SUB)
    await_previous(PDL)
    residual = None
    if HAS_RESIDUAL and EPILOGUE:                  # written before this kernel: read it now, add it at the end
        residual = residual_tile(r_ptr, row + tl.arange(0, 1), rn, M, N, stride_rm)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if PREFETCH:                              # the next tile's loads fly while this one computes
            v0, v1, v2, v3, v4, v5, v6, v7, t0, t1, t2, t3, t4, t5, t6, t7 = _row_tiles(
                w_ptr, s_ptr, n0, N, K, stride_wn, stride_sn, group_size, k0 + BLOCK_K, k_end, cols, rg, ROWS, BITS,
                HALF, VEC, GROUPED, SUB)
        else:
            w0, w1, w2, w3, w4, w5, w6, w7, s0, s1, s2, s3, s4, s5, s6, s7 = _row_tiles(
                w_ptr, s_ptr, n0, N, K, stride_wn, stride_sn, group_size, k0, k_end, cols, rg, ROWS, BITS, HALF, VEC,
                GROUPED, SUB)
        xa, xb = _fma_x(x_ptr, x_row, k0, k_end, cols, BITS, HALF)
        if NORM:
            ga, gb = xa, xb
            if NORM_WEIGHT:
                ga, gb = _fma_x(g_ptr, g_ptr, k0, k_end, cols, BITS, HALF)
            xa, xb, part_sum, part_squares = _norm_x(xa, xb, ga, gb, BITS, HALF, ASM, NORM_WEIGHT)
            x_sum += part_sum
            x_squares += part_squares
        x0, x1, x2, x3 = xa, xa, xb, xb
        if HALF and BITS == 4:                    # the fp16 pairs of `int4_half_dot`, once for all rows
            x0, x1 = xa.to(tl.int32), (xa >> 32).to(tl.int32)
            x2, x3 = xb.to(tl.int32), (xb >> 32).to(tl.int32)
        elif not HALF:
            xa, xb = xa.to(tl.float32), xb.to(tl.float32)
        acc0 += _row_sums(w0, s0, xa, xb, x0, x1, x2, x3, BITS, HALF, ASM, GROUPED)
        if ROWS > 1:
            acc1 += _row_sums(w1, s1, xa, xb, x0, x1, x2, x3, BITS, HALF, ASM, GROUPED)
        if ROWS > 2:
            acc2 += _row_sums(w2, s2, xa, xb, x0, x1, x2, x3, BITS, HALF, ASM, GROUPED)
            acc3 += _row_sums(w3, s3, xa, xb, x0, x1, x2, x3, BITS, HALF, ASM, GROUPED)
        if ROWS > 4:
            acc4 += _row_sums(w4, s4, xa, xb, x0, x1, x2, x3, BITS, HALF, ASM, GROUPED)
            acc5 += _row_sums(w5, s5, xa, xb, x0, x1, x2, x3, BITS, HALF, ASM, GROUPED)
            acc6 += _row_sums(w6, s6, xa, xb, x0, x1, x2, x3, BITS, HALF, ASM, GROUPED)
            acc7 += _row_sums(w7, s7, xa, xb, x0, x1, x2, x3, BITS, HALF, ASM, GROUPED)
        if PREFETCH:
            w0, w1, w2, w3, w4, w5, w6, w7 = v0, v1, v2, v3, v4, v5, v6, v7
            s0, s1, s2, s3, s4, s5, s6, s7 = t0, t1, t2, t3, t4, t5, t6, t7
    lane = tl.arange(0, ROWS)
    out = tl.where(lane == 0, tl.sum(tl.sum(acc0, axis=1), axis=0), 0.0)
    if ROWS > 1:
        out += tl.where(lane == 1, tl.sum(tl.sum(acc1, axis=1), axis=0), 0.0)
    if ROWS > 2:
        out += tl.where(lane == 2, tl.sum(tl.sum(acc2, axis=1), axis=0), 0.0)
        out += tl.where(lane == 3, tl.sum(tl.sum(acc3, axis=1), axis=0), 0.0)
    if ROWS > 4:
        out += tl.where(lane == 4, tl.sum(tl.sum(acc4, axis=1), axis=0), 0.0)
        out += tl.where(lane == 5, tl.sum(tl.sum(acc5, axis=1), axis=0), 0.0)
        out += tl.where(lane == 6, tl.sum(tl.sum(acc6, axis=1), axis=0), 0.0)
        out += tl.where(lane == 7, tl.sum(tl.sum(acc7, axis=1), axis=0), 0.0)
    if BITS == 4:
        out *= 16.0
    elif HALF:
        out *= 128.0
    out = out * row_scale
    if NORM:
        mean = 0.0
        if NORM == 1:
            mean = tl.sum(tl.sum(x_sum, axis=1), axis=0) / K
        var = tl.sum(tl.sum(x_squares, axis=1), axis=0) / K - mean * mean
        out = (out - mean * c1) * (1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps))
    out = out[None, :]                                                      # [1, ROWS]
    rm = row + tl.arange(0, 1)
    if EPILOGUE:
        out = epilogue(out, rm, rn, M, N, bias, r_ptr, stride_rm, HAS_BIAS, ACT, HAS_RESIDUAL, residual)
    offsets = pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=(rn < N)[None, :])
