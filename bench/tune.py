"""The gemv tuner's choices for the benchmark models, timed before anything is measured: builds each
engine once (its start-up runs a decode-shaped step of every row bucket up to 64,
`ModelRunner.tune_kernels`, which is when `kernels.gemv_tuner.tuned_tile` times the candidates of
each product; the shipped tables are ignored, RAYSPEED_GEMV_SHIPPED=0, so the current kernels are
timed) and copies the table it wrote to
--out, merged with what is there already (one process per GPU may tune one model each; give each
its own $RAYSPEED_CACHE). Commit that table to kernels/tuned/ to ship it, so `bench/decode.py`'s
load times are those of a start that times nothing.

    python3 bench/tune.py --model neo --dtypes float16,int8,int4 --out bench/results

`--refine-rows` instead takes the shipped table of this GPU and, for each product of one or two
rows, times its choice against the `rows` tiles (kernels/gemv_rows.py) with the tuner's own clock,
the winner again with its next tile prefetched and with its K slice asked of L2, and writes the
table with the faster choices to --out (one or two minutes, against a whole re-tune's ten or more).
"""
import argparse
import ast
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rayspeed  # noqa: E402
from bench.decode import KV_BLOCKS, build, commit, merge_tuned_table  # noqa: E402


MODEL_K = {"neo": (2560, 10240), "llama": (4096, 11008)}       # the K of each model's products


def refine_rows(model: str, dtypes: str, out: str, max_rows: int) -> None:
    """See the module's docstring: each one- or two-row choice of the shipped table against `rows` tiles."""
    from dataclasses import asdict

    from kernels.gemv import Tile, skinny_linear
    from kernels.gemv_tuner import CUBLAS, FMA_MAX_ROWS, _Choices, _l2_bytes, rows_candidates, rows_twins, \
        time_in_graph
    device = torch.device("cuda", 0)
    name = _Choices._name(torch.cuda.get_device_name())
    wanted = {{"int8": 8, "int4": 4}.get(d, 16) for d in dtypes.split(",")}
    table = json.load(open(os.path.join(ROOT, "kernels", "tuned", name)))
    changed = []
    for key, choice in table.items():
        m, n, k, bits, group, dtype, bias, activation, residual = ast.literal_eval(key)
        if m > min(max_rows, FMA_MAX_ROWS) or choice == CUBLAS or k not in MODEL_K[model] or bits not in wanted:
            continue
        dtype = getattr(torch, dtype.split(".")[-1])
        x = torch.randn(m, k, device=device, dtype=dtype)
        if bits == 16:
            weight, scales = torch.randn(n, k, device=device, dtype=dtype) * 0.02, None
        else:
            weight = (torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8) if bits == 8 else
                      torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8))
            scales = torch.rand(n, -(-k // group), device=device, dtype=dtype) * 1e-3
        b = torch.randn(n, device=device, dtype=dtype) if bias else None
        r = torch.randn(m, n, device=device, dtype=dtype) if residual else None
        copies = max(1, min(16, -(-2 * _l2_bytes(device) // (weight.numel() * weight.element_size()))))
        weights = [weight] + [weight.clone() for _ in range(copies - 1)]      # scales too: none stays in L2
        scale_copies = [scales] + [None if scales is None else scales.clone() for _ in range(copies - 1)]

        def timed(tile: Tile) -> float:
            try:
                return time_in_graph(lambda i: skinny_linear(x, weights[i], b, scale_copies[i], bits, group, tile,
                                                             activation, r), copies)
            except Exception as e:                       # a tile this shape or GPU cannot take
                print("skip", tile, type(e).__name__, flush=True)
                return float("inf")
        timings = {tile: timed(tile) for tile in [Tile(**choice), *rows_candidates(k, bits, group, dtype)]}
        best = min(timings, key=timings.get)
        if best.rows:
            for twin in rows_twins(best):
                timings[twin] = timed(twin)
            best = min(timings, key=timings.get)
        shipped = timings[Tile(**choice)]
        print(f"{key}: shipped {shipped * 1e3:.2f} us, best {timings[best] * 1e3:.2f} us {best}", flush=True)
        if best != Tile(**choice):
            table[key] = asdict(best)
            changed.append({"key": key, "shipped_us": shipped * 1e3, "best_us": timings[best] * 1e3,
                            "tile": asdict(best)})
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        json.dump(table, f, indent=0)
    with open(os.path.join(out, f"{name[:-5]}-rows-refined.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
                   "changed": changed}, f, indent=1)
    print(f"{len(changed)} choices changed; wrote {out}/{name}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["neo", "llama"], default="neo")
    ap.add_argument("--dtypes", default="float16,int8,int4")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--refine-rows", action="store_true", help="only: the shipped table against `rows` tiles")
    ap.add_argument("--max-rows", type=int, default=2, help="with --refine-rows: products of up to this many rows")
    args = ap.parse_args()
    if args.refine_rows:
        return refine_rows(args.model, args.dtypes, args.out, args.max_rows)
    os.environ["RAYSPEED_GEMV_SHIPPED"] = "0"             # re-time the shapes kernels/tuned/ holds as well
    hf = build(args.model)
    for dtype in args.dtypes.split(","):
        t = time.perf_counter()
        engine = rayspeed.init_inference(hf, dtype=dtype, replace_with_kernel_inject=True,
                                         kv_cache_blocks=KV_BLOCKS[args.model], max_num_seqs=64)
        print(f"{args.model} {dtype}: built and tuned in {time.perf_counter() - t:.1f} s", flush=True)
        engine.shutdown()
        del engine
        torch.cuda.empty_cache()
    merged = merge_tuned_table(torch.cuda.get_device_name(), args.out)
    print("merged", merged, "choices into", args.out)


if __name__ == "__main__":
    main()
