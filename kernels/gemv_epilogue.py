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
def epilogue(acc, rm, rn, M, N, bias, r_ptr, stride_rm, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
             HAS_RESIDUAL: tl.constexpr):
    """fp32 [BM, BN] -> act(acc + bias) + residual, in that order; `bias` from `feature_params`."""
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
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        acc += tl.load(r_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def store_tile(acc, rm, rn, M, N, pid_k, split, bias, r_ptr, stride_rm, out_ptr, ws_ptr, counters_ptr,
               SPLIT: tl.constexpr, TICKET: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
               HAS_RESIDUAL: tl.constexpr):
    """Where a program's fp32 tile acc [BM, BN] goes (rows rm, features rn; out [M, N] and the
    partials ws [split, M, N] contiguous). Unsplit: through the epilogue into out. Split K: its
    partial into ws; with TICKET, the program that stores its tile's last partial (told by a ticket
    from `counters`, one per output tile, which it resets to zero) adds the partials up in split
    order, so the sum does not depend on which program finished last, and applies the epilogue:
    no second kernel, and no launch and wait between the two. Without TICKET a second kernel does
    that (`_split_k_reduce_kernel`)."""
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * N + rn[None, :]
    if not SPLIT:
        acc = epilogue(acc, rm, rn, M, N, bias, r_ptr, stride_rm, HAS_BIAS, ACT, HAS_RESIDUAL)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + pid_k * M * N + offs, acc, mask=mask)
        if TICKET:
            tile = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
            tl.debug_barrier()                         # every thread's stores before the ticket (released with it)
            ticket = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if ticket == split - 1:                    # every partial is visible: add them up (from L2, not L1)
                tl.store(counters_ptr + tile, 0)
                total = tl.zeros(acc.shape, tl.float32)
                for s in range(split):
                    total += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
                total = epilogue(total, rm, rn, M, N, bias, r_ptr, stride_rm, HAS_BIAS, ACT, HAS_RESIDUAL)
                tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
