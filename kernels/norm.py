"""LayerNorm and RMSNorm: torch references (the CPU path) and Triton kernels (one program per row)."""
import torch
import triton
import triton.language as tl

from kernels.dispatch import use_triton


def layer_norm_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Reference: statistics in fp32, result in x's dtype. x: [..., hidden]."""
    y = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], weight.float(),
                                       None if bias is None else bias.float(), eps)
    return y.to(x.dtype)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference (Llama's order): normalise in fp32, cast back to x's dtype, then scale. x: [..., hidden]."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


@triton.jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, x_row_stride, hidden, eps,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / hidden
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / hidden
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, x_row_stride, hidden, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    y = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


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


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Triton LayerNorm, fp32 statistics, result in x's dtype. x: [..., hidden]."""
    rows = _check_norm_inputs(x, weight, bias)                  # [rows, hidden]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    hidden = x.shape[-1]
    if rows.shape[0] == 0:
        return out
    _layer_norm_kernel[(rows.shape[0],)](rows, weight, weight if bias is None else bias, out,
                                         rows.stride(0), hidden, eps, HAS_BIAS=bias is not None,
                                         BLOCK=triton.next_power_of_2(hidden))
    return out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm in the reference's order; result dtype is that of `weight * x` (x's dtype when they match)."""
    rows = _check_norm_inputs(x, weight)                        # [rows, hidden]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    hidden = x.shape[-1]
    if rows.shape[0] == 0:
        return out
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), hidden, eps,
                                       BLOCK=triton.next_power_of_2(hidden))
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension: Triton on CUDA, the torch reference elsewhere."""
    if use_triton(x):
        return layer_norm_triton(x, weight, bias, eps)
    return layer_norm_torch(x, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: Triton on CUDA, the torch reference elsewhere."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_torch(x, weight, eps)
