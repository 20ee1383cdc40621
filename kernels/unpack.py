"""Quantized numbers into floats in registers, for the Triton kernels of kernels/gemv.py: integer
to float without a conversion instruction (I2F runs at a quarter of the FMA rate), by placing the
integer in the mantissa of a float whose exponent fixes its weight and subtracting the offset; and
the dot products of a 32-bit word of int4 (eight columns, `int4_half_dot`) or int8 weights (four,
`int8_half_dot`) in packed fp16 arithmetic."""
import triton
import triton.language as tl


@triton.jit
def u4_to_f32(nibble):
    """int32 nibbles 0..15 -> float32 nibble - 8 without a conversion instruction: OR-ing the nibble
    into the mantissa of 2^23 gives 2^23 + nibble exactly."""
    return (nibble | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def one_plus_sixteenth(v):
    """int32 -> float32 1 + (v & 15) / 16: the nibble placed in the top mantissa bits of 1.0. The
    CUDA-core kernel multiplies these by x and takes 1.5 x off once per x value (not per weight):
    q - 8 = 16 (f - 1.5), with the 16 applied to the row's sum."""
    return (((v << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def nibble_minus_8(nibble, dtype: tl.constexpr):
    """int32 nibbles 0..15 -> nibble - 8 in `dtype` by the mantissa trick at that width (fp16:
    1024 + n, bf16: 128 + n), which spares the slow integer-to-half conversions."""
    if dtype == tl.float16:
        return (nibble | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0
    elif dtype == tl.bfloat16:
        return (nibble | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 136.0
    else:
        return u4_to_f32(nibble).to(dtype)


@triton.jit
def s8_to_f32(q):
    """int8 -> float32 the same way: 2^23 + (q + 128), then subtract 2^23 + 128."""
    return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def s8_to(q, dtype: tl.constexpr):
    """int8 -> `dtype`: in fp16 as 1024 + (q + 128) - 1152 (exact: fp16 holds 1024..2047 in steps of
    one); bf16's 8-bit mantissa cannot, so through float32."""
    if dtype == tl.float16:
        return (q.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
    else:
        return s8_to_f32(q).to(dtype)


@triton.jit
def int4_half_dot(w, x0, x1, x2, x3, ASM: tl.constexpr):
    """Per 32-bit word of packed int4 weights (8 columns: nibble j holds column j), the sum of its
    eight products with x, in fp32, divided by 16. The words' x come as fp16 pairs in 32-bit words
    x0 = (x[0], x[4]), x1 = (x[1], x[5]), x2 = (x[2], x[6]), x3 = (x[3], x[7]), matching what one
    LOP3 makes of a word: nibbles j and j + 4 OR-ed into both halves of fp16 1024, at the bottom of
    the mantissa (1024 + n, j = 0 and 2, the word shifted right by 8 for 2) or four bits up
    (1024 + 16 n, j = 1 and 3). One fp16x2 FMA each turns them into exactly (n - 8) / 16
    ((1024 + n) / 16 - 64.5, (1024 + 16 n) / 256 - 4.5), and packed multiply-adds do two columns an
    instruction: 17 instructions for 8 weights, one shift among them (the previous form, 1 + n/16
    in the top mantissa bits, took a shift and a subtraction per pair: 21). The 4-product sums per
    half stay in fp16 (|sum| <= 2 max|x|, rounding ~1e-3 relative, far under int4's own error);
    their two halves add in fp32. ASM=False computes the same values in Triton operations (the
    interpreter runs no inline assembly)."""
    if ASM:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 t, q, a, s0, o0, s1, o1;
            .reg .f16 lo, hi;
            .reg .f32 flo, fhi;
            mov.b32 s0, 0x2C002C00;
            mov.b32 o0, 0xD408D408;
            mov.b32 s1, 0x1C001C00;
            mov.b32 o1, 0xC480C480;
            lop3.b32 q, $1, 0x000F000F, 0x64006400, 0xEA;
            fma.rn.f16x2 q, q, s0, o0;
            mul.f16x2 a, q, $2;
            lop3.b32 q, $1, 0x00F000F0, 0x64006400, 0xEA;
            fma.rn.f16x2 q, q, s1, o1;
            fma.rn.f16x2 a, q, $3, a;
            shr.u32 t, $1, 8;
            lop3.b32 q, t, 0x000F000F, 0x64006400, 0xEA;
            fma.rn.f16x2 q, q, s0, o0;
            fma.rn.f16x2 a, q, $4, a;
            lop3.b32 q, t, 0x00F000F0, 0x64006400, 0xEA;
            fma.rn.f16x2 q, q, s1, o1;
            fma.rn.f16x2 a, q, $5, a;
            mov.b32 {lo, hi}, a;
            cvt.f32.f16 flo, lo;
            cvt.f32.f16 fhi, hi;
            add.f32 $0, flo, fhi;
            }""",
            "=f,r,r,r,r,r", [w, x0, x1, x2, x3], dtype=tl.float32, is_pure=True, pack=1)
    else:                                              # the same order: nibble j and j + 4 against x_j
        low = nibble_sixteenths(w) * low_half(x0, tl.float16)
        high = nibble_sixteenths(w >> 16) * high_half(x0, tl.float16)
        low += nibble_sixteenths(w >> 4) * low_half(x1, tl.float16)
        high += nibble_sixteenths(w >> 20) * high_half(x1, tl.float16)
        low += nibble_sixteenths(w >> 8) * low_half(x2, tl.float16)
        high += nibble_sixteenths(w >> 24) * high_half(x2, tl.float16)
        low += nibble_sixteenths(w >> 12) * low_half(x3, tl.float16)
        high += nibble_sixteenths(w >> 28) * high_half(x3, tl.float16)
        return low.to(tl.float32) + high.to(tl.float32)


@triton.jit
def int8_half_dot(w, x0, x1, ASM: tl.constexpr):
    """Per 32-bit word of int8 weights (4 columns: byte j holds column j), the sum of its four
    products with x, in fp32, divided by 128. Its x come as fp16 pairs in 32-bit words, in order:
    x0 = (x[0], x[1]), x1 = (x[2], x[3]). The bytes, their sign bit flipped (q + 128), go by one
    PRMT each pair into the mantissas of two fp16 1024s (1024 + q + 128), and one fp16x2 FMA makes
    both exactly q / 128 (8 + (q + 128) / 128 is exact in fp16, and so is taking 9 off); packed
    multiply-adds then do two columns an instruction. |q / 128| < 1, so each half's two-product sum
    stays within 2 max|x| (fp16 rounding ~5e-4 relative, under int8's own error); the halves add in
    fp32. ASM=False computes the same in Triton operations (the interpreter runs no inline assembly)."""
    if ASM:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 u, q, a, s, o, m;
            .reg .f16 lo, hi;
            .reg .f32 flo, fhi;
            mov.b32 s, 0x20002000;
            mov.b32 o, 0xC880C880;
            mov.b32 m, 0x64646464;
            xor.b32 u, $1, 0x80808080;
            prmt.b32 q, u, m, 0x4140;
            fma.rn.f16x2 q, q, s, o;
            mul.f16x2 a, q, $2;
            prmt.b32 q, u, m, 0x4342;
            fma.rn.f16x2 q, q, s, o;
            fma.rn.f16x2 a, q, $3, a;
            mov.b32 {lo, hi}, a;
            cvt.f32.f16 flo, lo;
            cvt.f32.f16 fhi, hi;
            add.f32 $0, flo, fhi;
            }""",
            "=f,r,r,r", [w, x0, x1], dtype=tl.float32, is_pure=True, pack=1)
    else:                                              # the same order: bytes 0, 2 low halves, 1, 3 high
        low = byte_over_128(w) * low_half(x0, tl.float16)
        high = byte_over_128(w >> 8) * high_half(x0, tl.float16)
        low += byte_over_128(w >> 16) * low_half(x1, tl.float16)
        high += byte_over_128(w >> 24) * high_half(x1, tl.float16)
        return low.to(tl.float32) + high.to(tl.float32)


@triton.jit
def byte_over_128(v):
    """int32 -> fp16 q / 128 of its low byte read as int8 q, exactly (as `int8_half_dot` builds it)."""
    return (((v & 0xFF) ^ 0x80) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) * 0.0078125 - 9.0


@triton.jit
def nibble_sixteenths(v):
    """int32 -> fp16 ((v & 15) - 8) / 16, exactly (as `int4_half_dot` builds it)."""
    return (((v & 0xF) << 6) | 0x3C00).to(tl.int16).to(tl.float16, bitcast=True) - 1.5


@triton.jit
def low_half(v, dtype: tl.constexpr):
    """The 16-bit float (`dtype`) in the low half of 32-bit integers."""
    return (v & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)


@triton.jit
def high_half(v, dtype: tl.constexpr):
    """The 16-bit float (`dtype`) in the high half of 32-bit integers."""
    return ((v >> 16) & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
