"""The host's share of a step: how long the model runner takes to turn scheduled sequences into the
step's device inputs (`prepare_prefill` for one 512-token prompt, `prepare_decode` for 32 sequences)
and the engine to check a 512-token prompt, on a tiny model on the CPU (the GPU host runs the same
Python). Medians of 5 rounds of 200 calls; the result, with the commit, goes to --out.

    python3 bench/host_step.py --out bench/results [--tag -before]
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rayspeed  # noqa: E402
from actors.sequence import SamplingParams, Sequence  # noqa: E402
from bench.decode import commit  # noqa: E402
from bench.output import write  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402


def us_per_call(fn, calls: int = 200, rounds: int = 5) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    hf = tiny_model("gpt_neo", max_position_embeddings=1024)
    engine = rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=True, max_out_tokens=1024,
                                     kv_cache_blocks=512)
    backend = engine.backend
    prompt = [(i * 7) % 200 + 3 for i in range(512)]
    long_seq = Sequence(prompt, SamplingParams(max_new_tokens=1), 0)
    backend.block_manager.allocate(long_seq)
    batch = [Sequence(prompt[:100 + i], SamplingParams(max_new_tokens=1), 0) for i in range(32)]
    for seq in batch:
        backend.block_manager.allocate(seq)
    result = {"device": f"cpu: {platform.processor() or platform.machine()}", "commit": commit(),
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "check_prompt_512_us": us_per_call(lambda: backend.check_prompt(prompt, 1)),
              "prepare_prefill_512_us": us_per_call(lambda: backend.runner.prepare_prefill([long_seq])),
              "prepare_decode_32_us": us_per_call(lambda: backend.runner.prepare_decode(batch))}
    print(json.dumps(result))
    write(result, args.out, "host-step" + args.tag, device="cpu")


if __name__ == "__main__":
    main()
