"""Fresh-prefill time of GPT-Neo 2.7B (random weights) under settings that differ by environment
variables, in one process on one engine: for each variant its prefill graphs are recaptured (the
settings are read when a kernel launches, so captured into the graph), then a whole 1-token
`generate` of one prompt is timed from an idle GPU (what bench/decode.py's prefill figure times)
and the prefill graph replayed back to back. Variants alternate, rounds over, so drift hits all.

    python3 bench/prefill_ab.py --variants "split=;whole=RAYSPEED_PREFILL_SPLIT=0,0" --length 512
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
from actors.sequence import SamplingParams  # noqa: E402
from bench.decode import build, commit  # noqa: E402
from bench.output import write  # noqa: E402
from bench.profile_step import replay_split, walls_ms  # noqa: E402


def parse_variants(text: str) -> dict[str, dict[str, str]]:
    """"name=VAR=value,VAR=value;name2=" -> {name: {VAR: value}} (a variant of no settings: as built)."""
    variants = {}
    for item in text.split(";"):
        name, _, settings = item.partition("=")
        env = {}
        for setting in filter(None, settings.split(" ")):
            var, _, value = setting.partition("=")
            env[var] = value
        variants[name.strip()] = env
    return variants


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", required=True, help='"name=VAR=value VAR2=value;name2=..." (";" between)')
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=12, help="timed generate calls a variant a round")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    variants = parse_variants(args.variants)
    engine = rayspeed.init_inference(build("neo"), dtype=args.dtype, replace_with_kernel_inject=True,
                                     kv_cache_blocks=2048, max_num_seqs=64).backend
    vocab, seed = engine.model.spec.vocab_size, iter(range(10**6))
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    prompts = [torch.randint(100, vocab - 100, (args.batch, args.length), generator=torch.Generator().manual_seed(s))
               .tolist() for s in range(64)]

    def call():
        engine.generate(prompts[next(seed) % len(prompts)], params)

    baseline = dict(os.environ)
    walls, replays = {v: [] for v in variants}, {v: [] for v in variants}
    for _ in range(args.rounds):
        for name, env in variants.items():
            os.environ.clear()
            os.environ.update({**baseline, **env})
            engine.runner.prefill_graphs.graphs.clear()        # recaptured at the next prefill of each bucket
            call()
            walls[name].append(statistics.median(walls_ms(call, args.calls)[1:]))
            replays[name].append(replay_split(engine, args.batch, args.length)["replay_ms_back_to_back"])
            print(name, f"wall {walls[name][-1]:.3f} ms, replay {replays[name][-1]:.3f} ms", flush=True)
    os.environ.clear()
    os.environ.update(baseline)
    result = {"device": torch.cuda.get_device_name(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
              "model": "neo", "dtype": args.dtype, "batch": args.batch, "length": args.length,
              "what": "1-token generate from an idle GPU (median of calls, per round) and the prefill graph "
                      "replayed back to back, ms, by variant",
              "variants": {name: {"env": env, "wall_ms": statistics.median(walls[name]),
                                  "replay_ms": statistics.median(replays[name]), "wall_rounds": walls[name],
                                  "replay_rounds": replays[name]} for name, env in variants.items()}}
    print(json.dumps({name: {k: round(v, 4) for k, v in row.items() if k in ("wall_ms", "replay_ms")}
                      for name, row in result["variants"].items()}), flush=True)
    write(result, args.out, f"prefill-ab-{args.dtype}-{args.batch}x{args.length}", indent=1)


if __name__ == "__main__":
    main()
