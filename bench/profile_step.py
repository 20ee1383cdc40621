"""Where one eager decode step of GPT-Neo 2.7B (fp16, random weights) spends GPU time, by kernel:
the same kernels a CUDA-graph replay runs, timed by the profiler one by one.

    python3 bench/profile_step.py --batch 1
"""
import argparse
import collections
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rayspeed  # noqa: E402
from actors.sequence import SamplingParams  # noqa: E402
from bench.decode import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--model", default="neo")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    engine = rayspeed.init_inference(build(args.model), dtype=args.dtype, replace_with_kernel_inject=True,
                                     gpu_memory_utilization=0.5).backend
    seqs = [engine.add_request(list(range(100 + i, 132 + i)), SamplingParams(max_new_tokens=64, ignore_eos=True))
            for i in range(args.batch)]
    for _ in range(4):
        engine.step()
    runner = engine.runner
    runner.graphs = None
    ids, pos, meta = runner.prepare_decode(seqs)
    step = lambda: runner._forward(ids, pos, meta, False)       # noqa: E731
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    totals, counts = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:90]] += event.device_time / 5
            counts[event.name[:90]] += 1 / 5
    total = sum(totals.values())
    print(json.dumps({"model": args.model, "dtype": args.dtype, "batch": args.batch, "kernel_us_per_step": total,
                      "kernels_per_step": sum(counts.values())}))
    for name, us in totals.most_common(args.top):
        print(f"{us:9.1f} us {us / total:6.1%} x{counts[name]:5.0f}  {name}")


if __name__ == "__main__":
    main()
