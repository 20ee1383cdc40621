"""The CPU engine (the torch fallback: what CI, the demo app and machines without GPUs run): greedy
tokens a second of the embedded demo model (tiny GPT-Neo, random weights) through
`engine.generate`, at 1 / 16 / 64 sequences of 128 new tokens; medians of 3 after a warm-up.

    python3 bench/cpu_engine.py --out bench/results [--tag -before]

To compare two commits on one machine, run this file from each tree (copy it into an older one).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rayspeed  # noqa: E402
from bench.soak import provenance  # noqa: E402
from serve_apps.demo_model import demo_checkpoint  # noqa: E402


def tokens_per_s(engine, seqs: int, new_tokens: int, rounds: int = 3) -> dict:
    prompts = [[1 + i, 2, 3, 4] for i in range(seqs)]
    engine.generate(prompts, max_new_tokens=8, ignore_eos=True)                 # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        engine.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
        times.append(time.perf_counter() - start)
    wall = statistics.median(times)
    return {"seqs": seqs, "new_tokens": new_tokens, "wall_s": round(wall, 4), "tok_per_s": round(seqs * new_tokens / wall, 1),
            "rounds_s": [round(t, 4) for t in times]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="a directory: writes cpu-<date>-cpu-engine<tag>.json there")
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    torch.set_num_threads(1)                     # as the test suite runs it: one thread a process
    engine = rayspeed.init_inference(checkpoint=demo_checkpoint(), dtype=torch.float32,
                                     replace_with_kernel_inject=True, max_num_seqs=64, kv_cache_blocks=1024)
    rows = []
    for seqs in (1, 16, 64):
        rows.append(tokens_per_s(engine, seqs, 128))
        print(rows[-1], flush=True)
    result = {"bench": "cpu_engine", "model": "demo tiny GPT-Neo (random weights), fp32", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "runs": rows} | provenance()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"cpu-{result['date']}-cpu-engine{a.tag}.json"), "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
