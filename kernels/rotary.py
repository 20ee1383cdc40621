"""Rotary position embedding: torch reference and Triton kernel.

`cos_sin` is a cache [max_positions, rotary_dim] holding cos in the first half of the last
dimension and sin in the second (built by `rotary_cos_sin`). Only the first `rotary_dim`
channels of each head rotate (partial rotary: GPT-J, GPT-NeoX); the rest pass through.
`interleaved=False` rotates (x[i], x[i + rotary_dim/2]) pairs (Llama, NeoX: "rotate_half");
`interleaved=True` rotates (x[2i], x[2i+1]) pairs (GPT-J).
"""
import torch
import triton
import triton.language as tl

from kernels.dispatch import use_triton
from kernels.pdl import await_previous
from kernels.pdl import enabled as programmatic_launch


def rotary_cos_sin(inv_freq: torch.Tensor, max_positions: int, scaling: float = 1.0) -> torch.Tensor:
    """cos/sin cache [max_positions, 2 * len(inv_freq)] in fp32; `scaling` multiplies both (YaRN-style)."""
    t = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.float())                # [positions, rotary_dim / 2]
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    # x: [tokens, heads, rotary_dim] fp32; cos, sin: [tokens, 1, rotary_dim / 2]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rotary_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                       interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference. q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim], positions: [tokens]."""
    rotary_dim = cos_sin.shape[-1]
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    out = []
    for x in (q, k):
        rot = _rotate(x[..., :rotary_dim].float(), cos, sin, interleaved).to(x.dtype)
        out.append(torch.cat([rot, x[..., rotary_dim:]], dim=-1) if rotary_dim < x.shape[-1] else rot)
    return out[0], out[1]


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, pos_ptr, cos_sin_ptr, x_tok_stride, x_head_stride, cos_sin_stride,
                   heads, head_dim, half, INTERLEAVED: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    x_row = x_ptr + tok * x_tok_stride + head * x_head_stride
    out_row = out_ptr + (tok * heads + head) * head_dim
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    i = tl.arange(0, BLOCK_R)
    rot_mask = i < half
    cos = tl.load(cos_sin_ptr + pos * cos_sin_stride + i, mask=rot_mask, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * cos_sin_stride + half + i, mask=rot_mask, other=0.0).to(tl.float32)
    if INTERLEAVED:
        i1, i2 = 2 * i, 2 * i + 1
    else:
        i1, i2 = i, i + half
    x1 = tl.load(x_row + i1, mask=rot_mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + i2, mask=rot_mask, other=0.0).to(tl.float32)
    tl.store(out_row + i1, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=rot_mask)
    tl.store(out_row + i2, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=rot_mask)
    d = 2 * half + tl.arange(0, BLOCK_D)
    pass_mask = d < head_dim
    tl.store(out_row + d, tl.load(x_row + d, mask=pass_mask), mask=pass_mask)


def _rotate_triton(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                   interleaved: bool) -> torch.Tensor:
    """Launch one program per (token, head) of x [tokens, heads, head_dim]; returns a new contiguous tensor."""
    tokens, heads, head_dim = x.shape
    half = cos_sin.shape[-1] // 2
    out = torch.empty((tokens, heads, head_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    pdl = programmatic_launch(x)
    _rotary_kernel[(tokens, heads)](x, out, positions, cos_sin, x.stride(0), x.stride(1), cos_sin.stride(0),
                                    heads, head_dim, half, INTERLEAVED=interleaved,
                                    BLOCK_R=triton.next_power_of_2(half),
                                    BLOCK_D=triton.next_power_of_2(max(head_dim - 2 * half, 1)), PDL=pdl,
                                    launch_pdl=pdl)
    return out


def _check_rotary_inputs(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    assert q.dim() == 3 and k.dim() == 3, f"q, k must be [tokens, heads, head_dim], got {q.shape}, {k.shape}"
    assert q.shape[0] == k.shape[0] == positions.shape[0], "q, k and positions must have the same token count"
    assert q.shape[2] == k.shape[2], f"q and k head_dim differ: {q.shape[2]} vs {k.shape[2]}"
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "q and k must be contiguous in head_dim"
    assert q.dtype == k.dtype and q.is_floating_point(), f"q, k dtypes must match: {q.dtype}, {k.dtype}"
    assert positions.dim() == 1 and positions.dtype in (torch.int32, torch.int64), "positions must be [tokens] int"
    assert positions.is_contiguous(), "positions must be contiguous"
    assert cos_sin.dim() == 2 and cos_sin.is_floating_point(), "cos_sin must be a float [max_positions, rotary_dim]"
    assert cos_sin.stride(-1) == 1, "cos_sin must be contiguous in its last dimension"
    assert k.device == positions.device == cos_sin.device == q.device, "inputs must share q's device"
    rotary_dim = cos_sin.shape[-1]
    assert rotary_dim % 2 == 0 and 0 < rotary_dim <= q.shape[2], f"bad rotary_dim {rotary_dim} for head_dim {q.shape[2]}"


def apply_rotary_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                        interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `apply_rotary_torch` (math in fp32); returns new contiguous q, k."""
    _check_rotary_inputs(q, k, positions, cos_sin)
    return (_rotate_triton(q, positions, cos_sin, interleaved),
            _rotate_triton(k, positions, cos_sin, interleaved))


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                 interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim]: Triton on CUDA, torch elsewhere."""
    if use_triton(q):
        return apply_rotary_triton(q, k, positions, cos_sin, interleaved)
    return apply_rotary_torch(q, k, positions, cos_sin, interleaved)
