"""GPT-Neo 2.7B greedy tokens with and without `prefetch_ahead` between attention and the output
projection (kernels.block.NEXT_L2_MB): the prefetch changes no value, so the tokens must be equal;
a wrong PDL chain (the projection reading attention's output early) would show here.

    python3 bench/next_l2_check.py --dtype int8+head --mb 12
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rayspeed  # noqa: E402
import kernels.block as block  # noqa: E402
from actors.sequence import SamplingParams  # noqa: E402
from bench.decode import build, dtype_args  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="int8+head")
    ap.add_argument("--mb", type=float, default=12)
    args = ap.parse_args()
    engine = rayspeed.init_inference(build("neo"), **dtype_args(args.dtype), replace_with_kernel_inject=True,
                                     kv_cache_blocks=1024, max_num_seqs=8).backend
    prompts = [[100 + 7 * i + j for j in range(32)] for i in range(4)]
    params = SamplingParams(max_new_tokens=160, ignore_eos=True)
    tokens = lambda outs: [o.outputs[0].token_ids for o in outs]      # noqa: E731
    runs = {}
    for mb in (0.0, args.mb):
        block.NEXT_L2_MB = mb
        engine.runner.capture_cudagraphs(engine.config.max_num_seqs, engine.max_seq_len)
        runs[mb] = [tokens(engine.generate([p], params))[0] for p in prompts]
        runs[f"{mb} batch 4"] = tokens(engine.generate(prompts, params))
    same = runs[0.0] == runs[args.mb] and runs["0.0 batch 4"] == runs[f"{args.mb} batch 4"]
    print(f"{args.dtype}: tokens with {args.mb} MB asked ahead equal those without: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
