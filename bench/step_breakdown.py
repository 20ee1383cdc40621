"""Where a decode step's time goes on the GPU: the CUDA-graph replay alone vs a whole engine step
(plan on the host, copies, replay, sampling, stop checks), GPT-Neo 2.7B (fp16, or --dtype), random
weights. With --host, the engine step's host functions by own time (cProfile), per step.

    python3 bench/step_breakdown.py --batches 1,32,256 [--dtype int8] --host --out bench/results
"""
import argparse
import cProfile
import io
import pstats
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rayspeed  # noqa: E402
from bench.decode import build, commit  # noqa: E402
from bench.output import write  # noqa: E402


def replay_ms(runner, seqs, iters: int = 50) -> float:
    ids, pos, meta = runner.prepare_decode(seqs)
    for _ in range(3):
        runner.graphs.run(ids, pos, meta)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        runner.graphs.run(ids, pos, meta)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def step_ms(engine, iters: int = 50) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--dtype", default="float16", help="float16, bfloat16, int8 or int4")
    ap.add_argument("--host", action="store_true", help="print the host profile of engine steps")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    hf = build("neo")
    engine = rayspeed.init_inference(hf, dtype=args.dtype, replace_with_kernel_inject=True,
                                     gpu_memory_utilization=0.6, max_num_seqs=max(64, *batches)).backend
    from actors.sequence import SamplingParams
    rows = {}
    for batch in batches:
        params = SamplingParams(max_new_tokens=400, ignore_eos=True)
        seqs = [engine.add_request(list(range(100 + i, 132 + i)), params) for i in range(batch)]
        engine.step()                                        # prefill
        for _ in range(5):
            engine.step()
        rows[batch] = {"engine_step_ms": step_ms(engine), "graph_replay_ms": replay_ms(engine.runner, seqs)}
        rows[batch]["host_ms"] = rows[batch]["engine_step_ms"] - rows[batch]["graph_replay_ms"]
        if args.host:
            profiler = cProfile.Profile()
            profiler.runcall(step_ms, engine, 20)
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
            print(f"batch {batch}: host functions, seconds over 20 steps", text.getvalue()[-2600:], flush=True)
        for seq in seqs:
            engine.abort(seq)
        print(batch, json.dumps(rows[batch]), flush=True)
    result = {"device": torch.cuda.get_device_name(), "commit": commit(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "model": "neo", "dtype": args.dtype, "batches": rows}
    write(result, args.out, f"step-breakdown-{args.dtype}")


if __name__ == "__main__":
    main()
