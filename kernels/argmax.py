"""Greedy decoding's argmax over the vocabulary, one row per sequence: torch's reduction gives each row
one block (13.9 us for one 50,257-token row on an H100, the largest op between two decode graphs),
so on CUDA the rows are split over many programs, each writing its part's maximum and first index,
and a second kernel picks each row's first index of the largest value, as torch.argmax does (NaN
aside: here a NaN never wins)."""
import torch
import triton
import triton.language as tl

from kernels.dispatch import use_triton

PART = 2048          # columns a program of the first pass reads


@triton.jit
def _argmax_parts_kernel(x_ptr, max_ptr, index_ptr, n, row_stride, PART: tl.constexpr, BLOCK: tl.constexpr):
    """Part `program_id(1)` of row `program_id(0)`: its largest value and that value's first column."""
    row, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
    start = part * PART
    end = tl.minimum(start + PART, n)
    cols = start + tl.arange(0, BLOCK)
    best = tl.load(x_ptr + row * row_stride + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
    where = cols                                         # each lane keeps its first column of its largest value
    for offset in range(BLOCK, PART, BLOCK):
        c = cols + offset
        v = tl.load(x_ptr + row * row_stride + c, mask=c < end, other=float("-inf")).to(tl.float32)
        better = v > best
        best = tl.where(better, v, best)
        where = tl.where(better, c, where)
    top = tl.max(best, axis=0)
    tl.store(max_ptr + row * tl.num_programs(1) + part, top)
    tl.store(index_ptr + row * tl.num_programs(1) + part, tl.min(tl.where(best == top, where, n), axis=0))


@triton.jit
def _argmax_rows_kernel(max_ptr, index_ptr, out_ptr, parts, n, BLOCK: tl.constexpr):
    """Row `program_id(0)`: the first column among its parts' largest values."""
    row = tl.program_id(0)
    p = tl.arange(0, BLOCK)
    top = tl.load(max_ptr + row * parts + p, mask=p < parts, other=float("-inf"))
    index = tl.load(index_ptr + row * parts + p, mask=p < parts, other=n)
    tl.store(out_ptr + row, tl.min(tl.where(top == tl.max(top, axis=0), index, n), axis=0).to(tl.int64))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest value (its first, on ties) of x [rows, n], int64 [rows]."""
    assert x.dim() == 2 and x.stride(1) == 1, f"x must be [rows, n] with contiguous rows, got {tuple(x.shape)}"
    if not use_triton(x) or x.numel() == 0:
        return x.argmax(dim=-1)
    rows, n = x.shape
    parts = triton.cdiv(n, PART)
    top = torch.empty(rows, parts, dtype=torch.float32, device=x.device)
    index = torch.empty(rows, parts, dtype=torch.int32, device=x.device)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    _argmax_parts_kernel[(rows, parts)](x, top, index, n, x.stride(0), PART=PART, BLOCK=min(PART, 1024))
    _argmax_rows_kernel[(rows,)](top, index, out, parts, n, BLOCK=max(triton.next_power_of_2(parts), 16))
    return out
