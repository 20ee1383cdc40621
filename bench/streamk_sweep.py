"""The stream-K GEMM (bench/streamk_gemm.py) against cuBLAS as the model calls it, and the plain
Triton GEMM of bench/gemm_sweep.py, on GPT-Neo 2.7B's four prefill products with their epilogues
(QKV plain; output projection bias + residual; MLP up bias + tanh GELU, cuBLASLt's epilogue; MLP
down bias + residual), at several row counts and tiles: microseconds back to back in a CUDA graph
over weight copies that miss L2 (`time_in_graph`), with each variant's error against cuBLAS. A
configuration "bm,bn,bk,warps,stages@P" fixes the persistent grid at P programs.

    python3 bench/streamk_sweep.py --rows 256,512,1024,2048 --tag=-name --out bench/results
"""
import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.decode import commit  # noqa: E402
from bench.gemm_sweep import triton_gemm  # noqa: E402
from bench.output import write  # noqa: E402
from bench.streamk_gemm import GemmConfig, streamk_linear  # noqa: E402
from kernels.gemv_tuner import time_in_graph  # noqa: E402

# (name, N, K, bias, activation, residual)
SHAPES = [("qkv", 7680, 2560, False, None, False), ("out", 2560, 2560, True, None, True),
          ("fc1", 10240, 2560, True, "gelu_tanh", False), ("fc2", 2560, 10240, True, None, True)]
CONFIGS = ["128,256,64,8,3", "128,256,64,8,4", "128,128,64,8,3", "128,128,64,4,3", "128,128,64,4,4",
           "128,128,32,4,5", "64,256,64,8,3", "64,128,64,4,4"]


def cublas(x, w, b, activation, r):
    """What kernels/linear.py's `_torch_matmul` runs for these epilogues."""
    if activation == "gelu_tanh":
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)
    y = F.linear(x, w, b)
    return y if r is None else y + r


def without_pdl(fn):
    """fn() with programmatic dependent launch off (read at launch, so captured into the graph)."""
    os.environ["RAYSPEED_PDL"] = "0"
    try:
        return fn()
    finally:
        del os.environ["RAYSPEED_PDL"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="256,512,1024,2048")
    ap.add_argument("--configs", default=";".join(CONFIGS))
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--shapes", default="qkv,out,fc1,fc2")
    ap.add_argument("--no-pdl", action="store_true", help="also the first configuration launched without PDL")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    configs = args.configs.split(";")
    rows_out = []
    for name, n, k, has_bias, activation, has_residual in SHAPES:
        if name not in args.shapes.split(","):
            continue
        copies = max(2, -(-200 * 2**20 // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(copies)]
        b = torch.randn(n, device="cuda", dtype=dtype) if has_bias else None
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            r = torch.randn(m, n, device="cuda", dtype=dtype) if has_residual else None
            ref = cublas(x, ws[0], b, activation, r).float()
            row = {"shape": name, "m": m, "n": n, "k": k, "us": {}, "tflops": {}, "rel_err": {}}
            zeros = torch.zeros(n, device="cuda", dtype=dtype)
            variants = {"cublas": lambda i: cublas(x, ws[i], b, activation, r),
                        "plain_128x256_w8_s4": lambda i: triton_gemm(x, ws[i], zeros, 128, 256, 64, 8, 4)}
            for text in configs:                        # "bm,bn,bk,warps,stages[@programs]"
                config, _, programs = text.partition("@")
                variants[f"streamk_{text.replace(',', '_')}"] = \
                    lambda i, c=GemmConfig.parse(config), p=int(programs) if programs else None: \
                    streamk_linear(x, ws[i], b, activation, r, c, programs=p)
            if args.no_pdl:
                variants["streamk_nopdl"] = lambda i, c=GemmConfig.parse(configs[0].partition("@")[0]): without_pdl(
                    lambda: streamk_linear(x, ws[i], b, activation, r, c))
            for key, fn in variants.items():
                try:
                    out = fn(0).float()
                    us = time_in_graph(fn, copies) * 1e3
                except Exception as e:                  # a tile that does not fit shared memory
                    print(name, m, key, "failed:", str(e).splitlines()[0][:120], flush=True)
                    continue
                row["us"][key], row["tflops"][key] = us, 2 * m * n * k / us / 1e6
                row["rel_err"][key] = ((out - ref).norm() / ref.norm()).item()
            row["best"] = min(row["us"], key=row["us"].get)
            rows_out.append(row)
            top = sorted(row["us"], key=row["us"].get)[:3]
            print(name, m, "cublas", round(row["us"]["cublas"], 2), [(key, round(row["us"][key], 2),
                  round(row["tflops"][key]), f"{row['rel_err'][key]:.1e}") for key in top], flush=True)
    result = {"device": torch.cuda.get_device_name(), "commit": commit(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype, "rows": rows_out}
    write(result, args.out, "streamk" + args.tag, indent=1)


if __name__ == "__main__":
    main()
