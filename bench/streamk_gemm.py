"""A stream-K GEMM for prefill-sized products, y = act(x W^T + bias) + residual: measured against
cuBLAS and slower on every GPT-Neo 2.7B prefill product, so the model keeps cuBLAS. Kept with its
sweep (bench/streamk_sweep.py) as the record of why; docs/performance.md has the numbers.

The idea: at a 512-token prefill cuBLAS runs GPT-Neo's products at 504-656 TFLOP/s because its
output tiles come in whole waves that do not fill 132 SMs (the output projection and MLP down make
80 tiles of 128 x 128). Here a persistent grid of about one program per SM shares the product's
K steps out evenly instead, whatever the tile count.

The programs form groups of COLUMN, one per row of tiles (COLUMN = the tile rows, up to the grid):
a group walks a column of COLUMN tiles stacked in M, its programs side by side over the same K steps
of the same weight slice, so each weight byte comes from HBM once. The work is the list of
(column, K step) pairs, column-major, and group g takes its [g * per, (g + 1) * per) share. A tile
whose K steps span several groups is finished by the group holding its first steps: that share ends
its range while the others begin theirs, so it arrives last and seldom waits. The others (a program
has at most one such share, in its first column) leave their fp32 partial sums in a workspace and
count themselves in (a counter per tile, reset by the finisher); the finisher waits for the count,
adds the shares in group order to its own accumulator (the result does not depend on timing),
applies the epilogue and stores. Groups are numbered last-first, so those a finisher waits for
launch (and, in Triton's interpreter, run) before it.
K must be a multiple of BLOCK_K; rows and features past M and N read clamped addresses and are not
stored.
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.gemv_epilogue import ACTIVATION_CODES, epilogue, feature_params


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    warps: int = 8
    stages: int = 3

    @classmethod
    def parse(cls, text: str) -> "GemmConfig":
        """"128,256,64,8,3" (block_m, block_n, block_k, warps, stages)."""
        return cls(*(int(v) for v in text.split(",")))


@triton.jit
def _store_tile(acc, rm, rn, M, N, bias_ptr, r_ptr, y_ptr, stride_rm, stride_ym, HAS_BIAS: tl.constexpr,
                ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    bias = feature_params(bias_ptr, rn, 1, N, HAS_BIAS, 0.0)
    acc = epilogue(acc, rm, rn, M, N, bias, r_ptr, stride_rm, HAS_BIAS, ACT, HAS_RESIDUAL)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _streamk_kernel(x_ptr, w_ptr, bias_ptr, r_ptr, y_ptr, ws_ptr, counts_ptr, M, N, K, stride_xm, stride_rm,
                    stride_ym, per_group, COLUMN, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                    PDL: tl.constexpr):
    groups = tl.num_programs(0) // COLUMN
    group = groups - 1 - tl.program_id(0) // COLUMN            # the last groups launch first (see below)
    row = tl.program_id(0) % COLUMN
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    steps = K // BLOCK_K                                       # K steps a tile
    total = tl.cdiv(tiles_m, COLUMN) * tiles_n * steps
    start = group * per_group
    end = tl.minimum(start + per_group, total)
    rk = tl.arange(0, BLOCK_K)
    pdl.await_previous(PDL)
    while start < end:
        column = start // steps                                 # COLUMN tiles stacked in M, one per program
        k_first = start - column * steps
        k_end = tl.minimum(steps, k_first + end - start)
        tile_m = column // tiles_n * COLUMN + row
        tile_n = column % tiles_n
        if tile_m < tiles_m:
            rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
            rm_in = tl.minimum(rm, M - 1)            # rows past the end repeat the last (their outputs are masked)
            rn_in = tl.minimum(rn, N - 1)
            x = x_ptr + rm_in[:, None] * stride_xm + rk[None, :]
            w = w_ptr + rn_in[:, None] * K + rk[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for step in range(k_first, k_end):
                a = tl.load(x + step * BLOCK_K)
                b = tl.load(w + step * BLOCK_K)
                acc = tl.dot(a, tl.trans(b), acc)
            if (k_first == 0) & (k_end == steps):              # the whole tile
                _store_tile(acc, rm, rn, M, N, bias_ptr, r_ptr, y_ptr, stride_rm, stride_ym, HAS_BIAS, ACT,
                            HAS_RESIDUAL)
            else:                                               # a share of the tile
                first_owner = column * steps // per_group       # the group holding its first K steps
                last_owner = ((column + 1) * steps - 1) // per_group
                stored = counts_ptr + tile_m * tiles_n + tile_n
                cell = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
                if group != first_owner:                        # leave it in the workspace, then count it in
                    slot = tl.program_id(0).to(tl.int64)        # a program's one share: its first column's
                    tl.store(ws_ptr + slot * (BLOCK_M * BLOCK_N) + cell, acc)
                    tl.debug_barrier()                          # every thread's stores before the count
                    tl.atomic_add(stored, 1, sem="release", scope="gpu")
                else:                                           # add the later shares in order as they come
                    count = tl.atomic_add(stored, 0, sem="acquire", scope="gpu")
                    while count < last_owner - first_owner:     # they started earlier: a short wait
                        count = tl.atomic_add(stored, 0, sem="acquire", scope="gpu")
                    tl.store(stored, 0)
                    for owner in range(first_owner + 1, last_owner + 1):
                        slot = ((groups - 1 - owner) * COLUMN + row).to(tl.int64)
                        acc += tl.load(ws_ptr + slot * (BLOCK_M * BLOCK_N) + cell, cache_modifier=".cg")
                    _store_tile(acc, rm, rn, M, N, bias_ptr, r_ptr, y_ptr, stride_rm, stride_ym, HAS_BIAS, ACT,
                                HAS_RESIDUAL)
        start = column * steps + k_end


_SCRATCH: dict = {}                 # device -> (counts int32, workspace fp32), grown outside graph capture


def _scratch(device: torch.device, tiles: int, ws_elems: int):
    """Zeroed share counts for `tiles` tiles and a workspace of `ws_elems` floats on `device`, allocated (or
    grown) outside any CUDA graph capture; None while capturing without a large enough pair (the
    prefill graphs' eager warm-up at the same shapes runs first)."""
    have = _SCRATCH.get(device)
    if have is not None and have[0].numel() >= tiles and have[1].numel() >= ws_elems:
        return have
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    tiles = max(tiles, 0 if have is None else have[0].numel())
    ws_elems = max(ws_elems, 0 if have is None else have[1].numel())
    if have is not None and device.type == "cuda":
        torch.cuda.synchronize(device)                  # earlier launches may still use the old pair
    _SCRATCH[device] = (torch.zeros(tiles, dtype=torch.int32, device=device),
                        torch.empty(ws_elems, dtype=torch.float32, device=device))
    return _SCRATCH[device]


@functools.cache
def _programs(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def streamk_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   activation: str | None = None, residual: torch.Tensor | None = None,
                   config: GemmConfig = GemmConfig(), programs: int | None = None) -> torch.Tensor | None:
    """act(x weight^T + bias) + residual for x [..., K] and weight [N, K] (row-major, K a multiple of
    config.block_k), or None where the shape or the moment does not allow it (the caller takes cuBLAS).
    `programs`: the persistent grid (default: one per SM on CUDA, 4 elsewhere)."""
    k = x.shape[-1]
    n = weight.shape[0]
    if k % config.block_k or weight.shape[1] != k or not weight.is_contiguous() or activation not in ACTIVATION_CODES:
        return None
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if residual is not None:
        residual = residual.reshape(m, n)
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
    tiles_m, tiles_n = triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n)
    if programs is None:
        programs = _programs(x.device.index or 0) if x.is_cuda else 4
    column = min(tiles_m, programs)                  # programs that walk one column of tiles side by side
    total = triton.cdiv(tiles_m, column) * tiles_n * (k // config.block_k)
    groups = max(1, min(programs // column, total))
    per_group = triton.cdiv(total, groups)
    groups = triton.cdiv(total, per_group)
    scratch = _scratch(x.device, tiles_m * tiles_n, groups * column * config.block_m * config.block_n)
    if scratch is None:
        return None
    counts, ws = scratch
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    use_pdl = pdl.enabled(x)
    _streamk_kernel[(groups * column,)](
        x2, weight, bias if bias is not None else weight, residual if residual is not None else y, y, ws, counts,
        m, n, k, x2.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0), per_group,
        column, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, HAS_BIAS=bias is not None,
        ACT=ACTIVATION_CODES[activation], HAS_RESIDUAL=residual is not None, PDL=use_pdl, launch_pdl=use_pdl,
        num_warps=config.warps, num_stages=config.stages)
    return y.view(*x.shape[:-1], n)
