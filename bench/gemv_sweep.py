"""Weight-streaming matmul on the GPU: cuBLAS (`F.linear`) vs `kernels.gemv.skinny_linear` at fp16,
int8 and int4 on the linear shapes of GPT-Neo 2.7B and Llama-2-7B, for a few row counts; timing the
tuner's candidate tiles per case (`--sweep`) shows what the heuristic leaves on the table. Every
timing replays a CUDA graph over enough distinct weight copies (> 4x the 50 MB L2) that each call
streams from HBM.

    python3 bench/gemv_sweep.py --out bench/results
"""
import argparse
import ast
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.decode import commit  # noqa: E402
from bench.output import write  # noqa: E402
from kernels.gemv import Tile, pick_tile, skinny_linear  # noqa: E402
from kernels.gemv_tuner import FMA_MAX_ROWS, candidates  # noqa: E402

SHAPES = {"neo.qkv": (7680, 2560), "neo.out": (2560, 2560), "neo.fc1": (10240, 2560), "neo.fc2": (2560, 10240),
          "llama.qkv": (12288, 4096), "llama.out": (4096, 4096), "llama.gate_up": (22016, 4096),
          "llama.down": (4096, 11008)}


def graph_us(fn, calls: int) -> float:
    """Median microseconds per call of `fn` (which makes `calls` calls), replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def weights(n: int, k: int, bits: int, copies: int):
    """`copies` distinct (weight, scales, group_size) triples in the format of `bits`."""
    out = []
    for _ in range(copies):
        if bits == 16:
            out.append((torch.randn(n, k, device="cuda", dtype=torch.half) * 0.02, None, None))
        elif bits == 8:
            out.append((torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8),
                        torch.rand(n, 1, device="cuda", dtype=torch.half) * 1e-3, k))
        else:
            out.append((torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8),
                        torch.rand(n, k // 128, device="cuda", dtype=torch.half) * 1e-3, 128))
    return out


def dequantize(w, scales, group_size, bits: int) -> torch.Tensor:
    """The fp32 weight a format stands for (the sweep's own reference)."""
    if bits == 16:
        return w.float()
    if bits == 4:
        w = torch.stack([(w & 0xF).int() - 8, (w >> 4).int() - 8], dim=-1).flatten(1)
    return w.float() * scales.float().repeat_interleave(group_size, dim=1)[:, :w.shape[1]]


def fma_grid(m: int, k: int, bits: int, group_size: int) -> list[Tile]:
    """A wider grid of CUDA-core tiles than the tuner's: shapes and warps."""
    tiles = []
    for block_n, block_k in ((2, 512), (4, 512), (8, 512), (2, 1024), (4, 1024), (8, 1024), (2, 2048), (4, 2048),
                             (2, 4096)):
        if block_k <= k and (group_size >= k or block_k % group_size == 0 or group_size % block_k == 0):
            tiles += [Tile(1, block_n, block_k, 1, warps, 1, fma=True) for warps in (2, 4, 8)]
    return tiles


def refine_prefetch(table_path: str, out: str) -> None:
    """For every CUDA-core tile a tuner table chose for one row, time it with and without
    `prefetch` on its shape (no epilogue; cold weights as above) and keep the faster: the refined
    table goes to `out` under the same name, the comparisons to stdout and out/...-prefetch.json."""
    table = json.load(open(table_path))
    rows = []
    for key, choice in table.items():
        m, n, k, bits, group = ast.literal_eval(key)[:5]
        if m != 1 or not isinstance(choice, dict) or not choice.get("fma"):
            continue
        copies = max(4, int(250e6 // (n * k * bits / 8)))
        ws = [(w, s, group if bits < 16 else None) for w, s, _ in weights(n, k, bits, copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.half)
        nbytes = sum(w.numel() * w.element_size() + (0 if s is None else s.numel() * 2) for w, s, _ in ws) / copies
        timings = {}
        for prefetch in (False, True):
            tile = Tile(**{**choice, "prefetch": prefetch})
            timings[prefetch] = graph_us(lambda: [skinny_linear(x, w, None, s, bits, g, tile) for w, s, g in ws],
                                         copies)
        choice["prefetch"] = timings[True] < timings[False]
        row = {"key": key, "us": timings[False], "prefetch_us": timings[True], "tb_s": nbytes / timings[False] / 1e6,
               "prefetch_tb_s": nbytes / timings[True] / 1e6}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del ws
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, os.path.basename(table_path)), "w") as f:
        json.dump(table, f, indent=0)
    write({"device": torch.cuda.get_device_name(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
           "table": os.path.basename(table_path), "rows": rows}, out, "prefetch")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refine-prefetch", metavar="TABLE", help="only: refine a tuner table's one-row CUDA-core "
                    "tiles with or without prefetch (see refine_prefetch)")
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--bits", default="16,8,4")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of tiles per case")
    ap.add_argument("--fma-grid", action="store_true", help="with --sweep: many more CUDA-core tiles")
    ap.add_argument("--family", choices=["fma", "dot", "swap"], help="with --sweep: only this kernel's tiles")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if args.refine_prefetch:
        return refine_prefetch(args.refine_prefetch, args.out)
    rows = []
    t0 = time.time()
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    for (name, (n, k)), bits in itertools.product(shapes.items(), [int(b) for b in args.bits.split(",")]):
        copies = max(4, int(250e6 // (n * k * bits / 8)))
        ws = weights(n, k, bits, copies)
        nbytes = sum(w.numel() * w.element_size() + (0 if s is None else s.numel() * 2) for w, s, _ in ws) / copies
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.half)
            row = {"shape": name, "n": n, "k": k, "m": m, "bits": bits, "weight_mb": nbytes / 1e6}
            if bits == 16:
                row["cublas_us"] = graph_us(lambda: [F.linear(x, w) for w, _, _ in ws], copies)
            elif bits == 8:                        # dequantize-then-cuBLAS: what a kernel-less path pays
                deq = ws[0][0].half()
                row["dequant_cublas_us"] = graph_us(lambda: [F.linear(x, deq.copy_(w)) for w, _, _ in ws], copies)
            tile = pick_tile(m, n, k, bits, ws[0][2] or k)
            ref = F.linear(x.float(), dequantize(*ws[0], bits))
            got = skinny_linear(x, ws[0][0], None, ws[0][1], bits, ws[0][2], tile)
            row["rel_err_vs_fp32"] = ((got.float() - ref).abs().max() / ref.abs().max()).item()
            row["triton_us"] = graph_us(lambda: [skinny_linear(x, w, None, s, bits, g, tile) for w, s, g in ws],
                                        copies)
            row["tile"] = tile.__dict__
            if args.sweep:
                best = {"": (row["triton_us"], tile)}          # overall, and per kernel family
                tiles = candidates(m, k, bits, ws[0][2] or k, x.dtype)
                if args.fma_grid and m <= FMA_MAX_ROWS:
                    tiles += fma_grid(m, k, bits, ws[0][2] or k)
                for cand in tiles:
                    family = "fma" if cand.fma else "swap" if cand.swap else "dot"
                    if args.family and family != args.family:
                        continue
                    try:
                        us = graph_us(lambda: [skinny_linear(x, w, None, s, bits, g, cand) for w, s, g in ws], copies)
                    except Exception as e:                          # a tile too big for shared memory
                        print("skip", cand, type(e).__name__, flush=True)
                        continue
                    if args.fma_grid and cand.fma:
                        print("fma", name, bits, round(us, 2), cand, flush=True)
                    for key in ("", family):
                        best[key] = min(best.get(key, (us, cand)), (us, cand), key=lambda b: b[0])
                for key, (us, cand) in best.items():
                    row[f"best{key and '_' + key}_us"], row[f"best{key and '_' + key}_tile"] = us, cand.__dict__
            for key in ("cublas_us", "dequant_cublas_us", "triton_us", "best_us", "best_fma_us", "best_dot_us",
                        "best_swap_us"):
                if key in row:
                    row[key.replace("_us", "_tb_s")] = nbytes / row[key] / 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
        del ws
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "seconds": time.time() - t0, "rows": rows}
    write(result, args.out, "gemv")


if __name__ == "__main__":
    main()
