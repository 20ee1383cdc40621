"""Engine decode steps of GPT-Neo 2.7B at batch 1 timed one by one (synchronised, host included), by
context, under each RAYSPEED_WHOLE_CONTEXT value (kernels.decode_plan.WHOLE_UP_TO, graphs recaptured):
what contexts advancing step by step cost. It found the 256-position whole reads costing every step
past 128 positions while `bench/whatif.py --configs` replays showed a gain: the replays had forced the
configuration for the split choice too, the engine had not (fixed by `kernels.decode_plan.decode_plan`).

    python3 bench/step_probe.py --dtype int8+head --whole 256,128,256
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rayspeed  # noqa: E402
import kernels.decode_plan as decode_plan  # noqa: E402
from actors.sequence import SamplingParams  # noqa: E402
from bench.decode import build, dtype_args  # noqa: E402


def step_times(engine, prompt: list[int], last: int) -> dict[int, float]:
    """ms of each engine step, keyed by the sequence's length after it, until it reaches `last`."""
    seq = engine.add_request(prompt, SamplingParams(max_new_tokens=last, ignore_eos=True))
    times = {}
    while len(seq) < last:
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times[len(seq)] = (time.perf_counter() - start) * 1e3
    engine.abort(seq)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="int8+head")
    ap.add_argument("--whole", default="256,128,256", help="WHOLE_UP_TO values, in turn")
    ap.add_argument("--trials", type=int, default=2)
    args = ap.parse_args()
    engine = rayspeed.init_inference(build("neo"), **dtype_args(args.dtype), replace_with_kernel_inject=True,
                                     kv_cache_blocks=1024, max_num_seqs=8).backend
    for whole in (int(w) for w in args.whole.split(",")):
        decode_plan.WHOLE_UP_TO = whole
        engine.runner.capture_cudagraphs(engine.config.max_num_seqs, engine.max_seq_len)
        for trial in range(args.trials):
            times = step_times(engine, list(range(100 + trial, 132 + trial)), 170)
            median = lambda a, b: statistics.median(v for c, v in times.items() if a <= c <= b)   # noqa: E731
            print(f"whole {whole} trial {trial}: median ms a step at 97-128 positions {median(97, 128):.3f}, "
                  f"129-160 {median(129, 160):.3f}; 127-133:",
                  " ".join(f"{c}:{times[c]:.2f}" for c in sorted(times) if 127 <= c <= 133), flush=True)


if __name__ == "__main__":
    main()
