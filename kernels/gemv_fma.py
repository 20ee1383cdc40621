"""The CUDA-core kernel of the weight-streaming matmul (kernels/gemv.py launches it): one row of x per
program, the weight streamed from HBM straight to registers, int8 and int4 turned into floats without
conversion instructions (kernels/unpack.py), the epilogue fused (kernels/gemv_epilogue.py). The
fastest at one or two rows (bench/results/*-gemv-fma.json)."""
import triton
import triton.language as tl

from kernels.gemv_epilogue import epilogue, feature_params, residual_tile
from kernels.pdl import await_previous, prefetch_l2
from kernels.unpack import high_half, int4_half_dot, int8_half_dot, low_half, one_plus_sixteenth, s8_to_f32


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
    bias = feature_params(b_ptr, rn, 1, N, HAS_BIAS and EPILOGUE, 0.0)
    row_scale = feature_params(s_ptr, rn, stride_sn, N, PER_ROW_SCALE, 1.0)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if PREFETCH:
        w = _fma_weights(w_ptrs, k_begin, k_end, cols, n_mask, BITS, HALF)      # weights never change: no wait
        await_previous(PDL)
        xa, xb = _fma_x(x_ptr, x_row, k_begin, k_end, cols, BITS, HALF)
    else:
        await_previous(PDL)
    residual = None
    if HAS_RESIDUAL and EPILOGUE:                  # written before this kernel: read it now, add it at the end
        residual = residual_tile(r_ptr, row + tl.arange(0, 1), rn, M, N, stride_rm)
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
        out *= row_scale[None, :]
    rm = row + tl.arange(0, 1)
    if EPILOGUE:
        out = epilogue(out, rm, rn, M, N, bias, r_ptr, stride_rm, HAS_BIAS, ACT, HAS_RESIDUAL, residual)
    offsets = pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=n_mask[None, :])
