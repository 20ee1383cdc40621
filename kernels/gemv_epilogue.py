"""The fused epilogue of the weight-streaming matmul kernels (kernels/gemv.py, kernels/gemv_fma.py):
bias, activation and residual applied to the fp32 accumulator before the one store."""
import triton
import triton.language as tl

ACTIVATION_CODES = {None: 0, "gelu_tanh": 1, "gelu": 2, "relu": 3, "silu": 4}


@triton.jit
def feature_params(ptr, rn, stride, N, PRESENT: tl.constexpr, DEFAULT: tl.constexpr):
    """fp32 [BN] values of a per-output-feature parameter (a bias, per-row scales) for features rn, or
    DEFAULT without one. Parameters never change: kernels launched with PDL read them before their
    wait, and a program's epilogue then waits for nothing but its residual."""
    values = tl.full(rn.shape, DEFAULT, tl.float32)
    if PRESENT:
        values = tl.load(ptr + rn * stride, mask=rn < N, other=DEFAULT).to(tl.float32)
    return values


@triton.jit
def residual_tile(r_ptr, rm, rn, M, N, stride_rm):
    """fp32 [BM, BN] of the residual for rows rm and features rn (0 outside). The CUDA-core kernels
    read it right after their PDL wait, so its latency hides behind the product instead of adding to
    every program's tail, and pass it to `epilogue` as `early_residual`."""
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    return tl.load(r_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def epilogue(acc, rm, rn, M, N, bias, r_ptr, stride_rm, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
             HAS_RESIDUAL: tl.constexpr, early_residual=None):
    """fp32 [BM, BN] -> act(acc + bias) + residual, in that order; `bias` from `feature_params`; the
    residual read here, or given (`residual_tile`, read earlier) as `early_residual`."""
    if HAS_BIAS:
        acc += bias[None, :]
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
        if early_residual is None:
            acc += residual_tile(r_ptr, rm, rn, M, N, stride_rm)
        else:
            acc += early_residual
    return acc
