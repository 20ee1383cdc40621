"""The gemv tuner's choices for the benchmark models, timed before anything is measured: builds each
engine once (its start-up runs a decode-shaped step of every row bucket up to 64,
`ModelRunner.tune_kernels`, which is when `kernels.gemv_tuner.tuned_tile` times the candidates of
each product; the shipped tables are ignored, RAYSPEED_GEMV_SHIPPED=0, so the current kernels are
timed) and copies the table it wrote to
--out, merged with what is there already (one process per GPU may tune one model each; give each
its own $RAYSPEED_CACHE). Commit that table to kernels/tuned/ to ship it, so `bench/decode.py`'s
load times are those of a start that times nothing.

    python3 bench/tune.py --model neo --dtypes float16,int8,int4 --out bench/results
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rayspeed  # noqa: E402
from bench.decode import KV_BLOCKS, build, merge_tuned_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["neo", "llama"], default="neo")
    ap.add_argument("--dtypes", default="float16,int8,int4")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
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
