"""LayerNorm and RMSNorm: torch references (the CPU path) and Triton kernels (one program per row).

Each takes an optional `residual`: then it normalises `x + residual` and also returns that sum (the
residual stream), so a block's residual add costs no kernel of its own; the sum is rounded to x's
dtype before the statistics, exactly as a separate add would."""
import torch
import triton
import triton.language as tl

from kernels.dispatch import use_triton
from kernels.pdl import await_previous
from kernels.pdl import enabled as programmatic_launch


def layer_norm_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                     residual: torch.Tensor | None = None):
    """Reference: statistics in fp32, result in x's dtype. x: [..., hidden]. With `residual`:
    (norm(x + residual), x + residual)."""
    if residual is not None:
        x = x + residual
        return layer_norm_torch(x, weight, bias, eps), x
    y = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], weight.float(),
                                       None if bias is None else bias.float(), eps)
    return y.to(x.dtype)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Reference (Llama's order): normalise in fp32, cast back to x's dtype, then scale. x: [..., hidden].
    With `residual`: (norm(x + residual), x + residual)."""
    if residual is not None:
        x = x + residual
        return rms_norm_torch(x, weight, eps), x
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


@triton.jit
def _load_row(x_ptr, r_ptr, sum_ptr, row, x_row_stride, r_row_stride, hidden, cols, mask,
              HAS_RESIDUAL: tl.constexpr):
    """Row `row` of x in fp32; with HAS_RESIDUAL, of x + residual, rounded to x's dtype and stored to sum."""
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * r_row_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * hidden + cols, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _layer_norm_kernel(x_ptr, r_ptr, sum_ptr, w_ptr, b_ptr, out_ptr, x_row_stride, r_row_stride, hidden, eps,
                       HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)     # parameters: read before the wait
    b = 0.0
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    await_previous(PDL)
    x = _load_row(x_ptr, r_ptr, sum_ptr, row, x_row_stride, r_row_stride, hidden, cols, mask, HAS_RESIDUAL)
    mean = tl.sum(x, axis=0) / hidden
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / hidden
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd * w + b
    tl.store(out_ptr + row * hidden + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, sum_ptr, w_ptr, out_ptr, x_row_stride, r_row_stride, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)     # the weight: read before the wait
    await_previous(PDL)
    x = _load_row(x_ptr, r_ptr, sum_ptr, row, x_row_stride, r_row_stride, hidden, cols, mask, HAS_RESIDUAL)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    y = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


# Warps of each row's program: 4 is the fastest or within 0.3 us of it at 1 to 512 rows for both
# norms (`*-norms.json`, H100; in GPT-Neo's decode and prefill 8 warps moved nothing).
NORM_WARPS = 4


def _check_norm_inputs(x: torch.Tensor, *params: torch.Tensor | None) -> torch.Tensor:
    """Validate x [..., hidden] and its per-channel parameters; return x as rows [rows, hidden]."""
    assert x.is_floating_point(), f"x must be floating point, got {x.dtype}"
    assert x.stride(-1) == 1, "x's last dimension must be contiguous"
    hidden = x.shape[-1]
    for p in params:
        if p is None:
            continue
        assert p.shape == (hidden,), f"parameter shape {tuple(p.shape)} != ({hidden},)"
        assert p.is_contiguous(), "norm parameters must be contiguous"
        assert p.device == x.device, f"parameter on {p.device}, x on {x.device}"
    return x.reshape(-1, hidden)


def _with_residual(x: torch.Tensor, residual: torch.Tensor | None):
    """(residual as rows, the tensor its sum with x goes to), or placeholders without a residual."""
    if residual is None:
        return x, x
    assert residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device, \
        f"residual {tuple(residual.shape)} {residual.dtype} does not match x {tuple(x.shape)} {x.dtype}"
    assert residual.stride(-1) == 1, "residual's last dimension must be contiguous"
    return residual.reshape(-1, x.shape[-1]), torch.empty(x.shape, dtype=x.dtype, device=x.device)


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                      residual: torch.Tensor | None = None, num_warps: int | None = None):
    """Triton LayerNorm, fp32 statistics, result in x's dtype. x: [..., hidden]. With `residual`:
    (norm(x + residual), x + residual)."""
    rows = _check_norm_inputs(x, weight, bias)                  # [rows, hidden]
    res_rows, summed = _with_residual(x, residual)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    hidden, pdl = x.shape[-1], programmatic_launch(x)
    if rows.shape[0]:
        _layer_norm_kernel[(rows.shape[0],)](rows, res_rows, summed, weight, weight if bias is None else bias, out,
                                             rows.stride(0), res_rows.stride(0), hidden, eps,
                                             HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                                             BLOCK=triton.next_power_of_2(hidden), PDL=pdl, launch_pdl=pdl,
                                             num_warps=num_warps or NORM_WARPS)
    return out if residual is None else (out, summed)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                    num_warps: int | None = None):
    """Triton RMSNorm in the reference's order; result dtype is that of `weight * x` (x's dtype when they
    match). With `residual`: (norm(x + residual), x + residual)."""
    rows = _check_norm_inputs(x, weight)                        # [rows, hidden]
    res_rows, summed = _with_residual(x, residual)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    hidden, pdl = x.shape[-1], programmatic_launch(x)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, res_rows, summed, weight, out, rows.stride(0), res_rows.stride(0),
                                           hidden, eps, HAS_RESIDUAL=residual is not None,
                                           BLOCK=triton.next_power_of_2(hidden), PDL=pdl, launch_pdl=pdl,
                                           num_warps=num_warps or NORM_WARPS)
    return out if residual is None else (out, summed)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
               residual: torch.Tensor | None = None):
    """LayerNorm over the last dimension (of x + residual, returned too, when given): Triton on CUDA,
    the torch reference elsewhere."""
    if use_triton(x):
        return layer_norm_triton(x, weight, bias, eps, residual)
    return layer_norm_torch(x, weight, bias, eps, residual)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dimension (of x + residual, returned too, when given): Triton on CUDA,
    the torch reference elsewhere."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)
