"""Upper bounds, not results: what a GPT-Neo 2.7B decode step (CUDA-graph replay, random weights)
would take if its norm kernels or its attention kernels cost nothing. Each variant swaps the part
for an identity (the numbers it computes are wrong, the kernels around it are the same) and
recaptures the graphs; the replays alternate variants so drift hits them all alike. With
--configs, the variants are decode attention configurations instead (RAYSPEED_DECODE_CONFIG), at
the context --context.

    python3 bench/whatif.py --dtypes int8,float16,int4 [--batch 1] [--context 38] [--out bench/results]
    python3 bench/whatif.py --configs "64,early,4 64,early-l2,4" --context 150
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
import kernels.block as block  # noqa: E402
from actors.sequence import SamplingParams  # noqa: E402
from bench.decode import build, commit  # noqa: E402
from bench.step_breakdown import replay_ms  # noqa: E402

REAL_NORM, REAL_ATTENTION = block.Norm.forward, block.attention


def no_norm(self, x, residual=None):
    return x if residual is None else (x, x)


def no_attention(q, k, v, *args, **kwargs):
    return q


VARIANTS = {"as built": (REAL_NORM, REAL_ATTENTION), "no norms": (no_norm, REAL_ATTENTION),
            "no attention": (REAL_NORM, no_attention), "neither": (no_norm, no_attention)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="int8,float16,int4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=38, help="tokens in each sequence's cache when timed")
    ap.add_argument("--configs", default="", help="space-separated RAYSPEED_DECODE_CONFIG values to compare")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    hf = build("neo")
    rows = {}
    for name in args.dtypes.split(","):
        engine = rayspeed.init_inference(hf, dtype=name, replace_with_kernel_inject=True, kv_cache_blocks=1024,
                                         max_num_seqs=max(8, args.batch)).backend
        params = SamplingParams(max_new_tokens=900, ignore_eos=True)
        seqs = [engine.add_request(list(range(100 + i, 132 + i)), params) for i in range(args.batch)]
        while len(seqs[0]) < args.context:            # prefill, then decode steps
            engine.step()
        variants = {c: (REAL_NORM, REAL_ATTENTION) for c in args.configs.split()} or VARIANTS
        times = {v: [] for v in variants}
        for _ in range(args.rounds):
            for variant, (norm, attn) in variants.items():
                block.Norm.forward, block.attention = norm, attn
                if args.configs:
                    os.environ["RAYSPEED_DECODE_CONFIG"] = variant
                engine.runner.capture_cudagraphs(engine.config.max_num_seqs, engine.max_seq_len)
                times[variant].append(replay_ms(engine.runner, seqs, iters=200))
        block.Norm.forward, block.attention = REAL_NORM, REAL_ATTENTION
        os.environ.pop("RAYSPEED_DECODE_CONFIG", None)
        rows[name] = {v: statistics.median(t) for v, t in times.items()}
        rows[name]["all"] = times
        print(name, json.dumps({v: round(t, 4) for v, t in rows[name].items() if v != "all"}), flush=True)
        for seq in seqs:
            engine.abort(seq)
        del engine
        torch.cuda.empty_cache()
    what = ("decode graph replay ms by RAYSPEED_DECODE_CONFIG" if args.configs else "decode graph replay ms: as "
            "built, and with the norms and/or attention swapped for identities (upper bounds of their cost, wrong numbers)")
    result = {"device": torch.cuda.get_device_name(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
              "model": "neo", "batch": args.batch, "context": args.context, "what": what, "ms": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{result['device'].replace(' ', '-')}-{result['date']}-whatif-bs{args.batch}-ctx{args.context}"
                        f"{'-configs' if args.configs else ''}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
