"""GPT-Neo 2.7B's one-row decode products as the engine runs them (the tuned tile of the shipped table
for this GPU, epilogue included) at fp16, int8 and int4. By default, for a profiler: compiled and
warmed up first, then each run once between cudaProfilerStart/Stop, so

    ncu --clock-control none --profile-from-start off --section SpeedOfLight ... python3 bench/gemv_decode.py

reports exactly those launches, in the order printed. --time times each product instead, in a CUDA
graph over cold weight copies (TB/s of weight streamed); --rows also times the `rows` tiles of
kernels/gemv_rows.py on each product and writes every timing to bench/results.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.decode import commit  # noqa: E402
from bench.gemv_sweep import dequantize, graph_us, weights  # noqa: E402
from kernels.gemv import Tile, skinny_linear  # noqa: E402
from kernels.gemv_tuner import _choices, rows_candidates  # noqa: E402

# name: (N, K, bias, activation, residual), as GPT-Neo's block calls them
PRODUCTS = {"qkv": (7680, 2560, False, None, False), "out": (2560, 2560, True, None, True),
            "fc1": (10240, 2560, True, "gelu_tanh", False), "fc2": (2560, 10240, True, None, True)}
FORMAT = {16: "fp16", 8: "int8", 4: "int4"}


def tile_for(n, k, bits, group, bias, act, residual) -> Tile:
    key = (1, n, k, bits, group, str(torch.float16), bias, act, residual, torch.device("cuda", 0))
    found = _choices.get(key, torch.cuda.get_device_name())
    assert isinstance(found, Tile), f"no shipped one-row tile for {key[:-1]} on {torch.cuda.get_device_name()}"
    return found


def cases(bits_list, names):
    for bits in bits_list:
        for name in names:
            n, k, bias, act, residual = PRODUCTS[name]
            group = 128 if bits == 4 else k
            yield name, bits, n, k, group, bias, act, residual, tile_for(n, k, bits, group, bias, act, residual)


def write(out: str, results: list) -> None:
    """The timings so far (rewritten after each product: a long sweep keeps what it measured)."""
    device = torch.cuda.get_device_name()
    path = os.path.join(out, f"{device.replace(' ', '-')}-{time.strftime('%Y-%m-%d')}-gemv-rows.json")
    with open(path, "w") as f:
        json.dump({"device": device, "commit": commit(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                   "triton": triton.__version__, "rows": results}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="16,8,4")
    ap.add_argument("--products", default=",".join(PRODUCTS))
    ap.add_argument("--time", action="store_true", help="time in CUDA graphs over cold copies instead")
    ap.add_argument("--rows", action="store_true", help="with --time: also every `rows` tile; results to --out")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    launches, results = [], []
    for name, bits, n, k, group, bias, act, residual, tile in cases([int(b) for b in args.bits.split(",")],
                                                                      args.products.split(",")):
        copies = max(4, int(250e6 // (n * k * bits / 8))) if args.time else 1
        ws = weights(n, k, bits, copies)
        x = torch.randn(1, k, device="cuda", dtype=torch.half)
        b = torch.randn(n, device="cuda", dtype=torch.half) if bias else None
        r = torch.randn(1, n, device="cuda", dtype=torch.half) if residual else None

        def run(i, tile, ws=ws, x=x, b=b, r=r, bits=bits, act=act):
            w, s, g = ws[i]
            return skinny_linear(x, w, b, s, bits, g, tile, act, r)
        expect = run(0, tile).float()
        w, s, g = ws[0]                                 # the tuned kernel, no epilogue, against fp32
        ref = F.linear(x.float(), dequantize(w, s, g, bits))
        plain = skinny_linear(x, w, None, s, bits, g, tile).float()
        err_fp32 = ((plain - ref).abs().max() / ref.abs().max()).item()
        if not args.time:
            launches.append((name, bits, tile, run))
            continue
        nbytes = sum(w.numel() * w.element_size() + (0 if s is None else s.numel() * 2) for w, s, _ in ws) / copies
        rows = rows_candidates(k, bits, group, x.dtype) if args.rows else []
        tiles = [tile] + rows + [replace(t, prefetch=True) for t in rows]
        for i, cand in enumerate(tiles):
            err = ((run(0, cand).float() - expect).abs().max() / expect.abs().max()).item()
            us = graph_us(lambda: [run(j, cand) for j in range(copies)], copies)
            row = {"product": name, "format": FORMAT[bits], "n": n, "k": k, "tuned": i == 0, "us": us,
                   "tb_s": nbytes / us / 1e6, "rel_diff_vs_tuned": err, "tile": asdict(cand)}
            if i == 0:
                row["tuned_rel_err_vs_fp32"] = err_fp32
            results.append(row)
            print(f"{name:4s} {FORMAT[bits]} {'tuned' if i == 0 else 'rows ':5s} {us:7.2f} us {row['tb_s']:5.2f} TB/s "
                  f"diff {err:.1e}{f' (vs fp32 {err_fp32:.1e})' if i == 0 else ''}  {cand}", flush=True)
        if args.rows:
            write(args.out, results)
            best = min((r for r in results if r["product"] == name and r["format"] == FORMAT[bits]), key=lambda r: r["us"])
            print(f"BEST {name} {FORMAT[bits]}: {best['us']:.2f} us {best['tb_s']:.2f} TB/s {best['tile']}", flush=True)
        del ws
    if args.time:
        return
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, bits, tile, run in launches:
        print(f"profiled: {name} {FORMAT[bits]} {tile}", flush=True)
        run(0, tile)
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
