"""The prefill's GEMMs (GPT-Neo 2.7B, 512 rows: QKV, attention output, MLP up and down) through cuBLAS
(`F.linear`, what the model runs; also with torch told to prefer cuBLAS or cuBLASLt, and through
TunableOp), two other cuBLAS formulations, and (without `--blas`) a plain Triton GEMM at several
tiles, warps, stages and K splits: microseconds and TFLOP/s back to back in a CUDA graph over weight
copies that miss L2, with each variant's error against cuBLAS. Kept to show why prefill keeps cuBLAS.

    python3 bench/gemm_sweep.py --out bench/results
"""
import argparse
import datetime
import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.decode import commit  # noqa: E402
from kernels.gemv_tuner import time_in_graph  # noqa: E402

SHAPES = [("qkv", 7680, 2560), ("out", 2560, 2560), ("fc1", 10240, 2560), ("fc2", 2560, 10240)]   # (name, N, K)


@triton.jit
def _gemm_kernel(a_ptr, w_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP: tl.constexpr, SPLIT: tl.constexpr):
    """c = a w^T + b for shapes the tiles divide; with SPLIT > 1, each of SPLIT programs per tile adds
    its K range's share to fp32 c (zeroed before)."""
    pid, part = tl.program_id(0), tl.program_id(1)
    tiles_m, tiles_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    first_m = pid // (GROUP * tiles_n) * GROUP                 # GROUP row tiles share their W tiles in L2
    group_m = min(tiles_m - first_m, GROUP)
    pm = first_m + pid % (GROUP * tiles_n) % group_m
    pn = pid % (GROUP * tiles_n) // group_m
    rm, rn = pm * BM + tl.arange(0, BM), pn * BN + tl.arange(0, BN)
    k0 = part * (K // SPLIT) + tl.arange(0, BK)
    a, w = a_ptr + rm[:, None] * K + k0[None, :], w_ptr + rn[:, None] * K + k0[None, :]
    acc = tl.zeros((BM, BN), tl.float32)
    for _ in range(0, K // SPLIT, BK):
        acc += tl.dot(tl.load(a), tl.trans(tl.load(w)))
        a += BK
        w += BK
    if part == 0:
        acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    if SPLIT == 1:
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))
    else:
        tl.atomic_add(c_ptr + rm[:, None] * N + rn[None, :], acc, sem="relaxed")


def triton_gemm(x, w, b, block_m, block_n, block_k, warps, stages, split=1):
    m, n = x.shape[0], w.shape[0]
    c = (torch.empty if split == 1 else torch.zeros)((m, n), device=x.device,
                                                     dtype=x.dtype if split == 1 else torch.float32)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split)
    _gemm_kernel[grid](x, w, b, c, m, n, x.shape[1], BM=block_m, BN=block_n, BK=block_k, GROUP=8, SPLIT=split,
                       num_warps=warps, num_stages=stages)
    return c if split == 1 else c.to(x.dtype)


def _with_blas(library: str, fn):
    """`fn` with torch's preferred BLAS library set to `library` ("cublas" or "cublaslt") while it runs
    (and while a graph captures it), the previous choice restored after."""
    def call(i):
        before = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library(library)
        try:
            return fn(i)
        finally:
            torch.backends.cuda.preferred_blas_library(before)
    return call


def _tuned(fn):
    """`fn` through TunableOp (torch.cuda.tunable): its first call, outside any graph, times every
    GEMM implementation torch registers for the shape and keeps the fastest; later calls replay it."""
    state = {"tuned": False}
    torch.cuda.tunable.set_filename("/tmp/tunableop_results.csv")      # not the working tree

    def call(i):
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(not state["tuned"])
        try:
            return fn(i)
        finally:
            state["tuned"] = True
            torch.cuda.tunable.tuning_enable(False)
            torch.cuda.tunable.enable(False)
    return call


def variants(x, ws, b, blas_only=False):
    linear = lambda i: torch.nn.functional.linear(x, ws[i], b)        # noqa: E731
    yield "cublas_linear", linear
    yield "linear_prefer_cublaslt", _with_blas("cublaslt", linear)
    yield "linear_prefer_cublas", _with_blas("cublas", linear)
    yield "linear_tunableop", _tuned(linear)
    if blas_only:
        return
    yield "cublas_mm_then_bias", lambda i: torch.mm(x, ws[i].t()) + b
    yield "cublas_swapped_output", lambda i: torch.addmm(b[:, None], ws[i], x.t())        # y^T: [N, M]
    for bm, bn, warps, stages in itertools.product((64, 128), (64, 128, 256), (4, 8), (3, 4)):
        if bm * bn < 128 * 256 or warps == 8:
            yield f"triton_{bm}x{bn}_w{warps}_s{stages}", \
                lambda i, c=(bm, bn, 64, warps, stages): triton_gemm(x, ws[i], b, *c)
    for bm, bn, split in ((128, 128, 2), (128, 128, 3), (64, 128, 2), (128, 64, 2)):
        if x.shape[1] % (split * 64) == 0:
            yield f"triton_{bm}x{bn}_split{split}", \
                lambda i, c=(bm, bn, 64, 4 if bm * bn <= 8192 else 8, 3, split): triton_gemm(x, ws[i], b, *c)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--blas", action="store_true", help="cuBLAS formulations only (library choice, TunableOp)")
    args = ap.parse_args()
    rows = []
    for name, n, k in SHAPES:
        copies = max(2, -(-200 * 2**20 // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.half) / k**0.5 for _ in range(copies)]
        b = torch.randn(n, device="cuda", dtype=torch.half)
        x = torch.randn(args.rows, k, device="cuda", dtype=torch.half)
        ref = torch.nn.functional.linear(x, ws[0], b).float()
        row = {"shape": name, "m": args.rows, "n": n, "k": k, "us": {}, "tflops": {}, "rel_err": {}}
        for key, fn in variants(x, ws, b, args.blas):
            try:
                out = fn(0).float()
                us = time_in_graph(fn, copies) * 1e3
            except Exception as e:                      # a tile that does not fit shared memory
                print(f"{name} {key}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            row["us"][key], row["tflops"][key] = us, 2 * args.rows * n * k / us / 1e6
            out = out if out.shape == ref.shape else out.t()         # the swapped formulation's y^T
            row["rel_err"][key] = ((out - ref).norm() / ref.norm()).item()
        row["best"] = min(row["us"], key=row["us"].get)
        rows.append(row)
        top = sorted(row["us"], key=row["us"].get)[:4]
        print(name, [(key, round(row["us"][key], 2), round(row["tflops"][key])) for key in top], flush=True)
    result = {"device": torch.cuda.get_device_name(), "commit": commit(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "triton": triton.__version__, "rows": rows}
    path = os.path.join(args.out, f"{torch.cuda.get_device_name().replace(' ', '-')}-{result['date']}-gemm-sweep{'-blas' if args.blas else ''}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
