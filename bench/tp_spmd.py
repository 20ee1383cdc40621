"""TP on several GPUs of one host without Ray: N processes (torch.multiprocessing) join one NCCL
group as a launcher would, each shards GPT-Neo 2.7B (random weights, fp16) in-process; rank 0
compares fp16 logits and greedy tokens with TP=1 and times decode at batch 1.

    python3 bench/tp_spmd.py --tp 2 --out bench/results
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(rank: int, tp: int, port: int, out: str, reference: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(tp), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import rayspeed
    from bench.decode import build, timed
    hf = build("neo")
    engine = rayspeed.init_inference(hf, tensor_parallel={"tp_size": tp}, dtype=torch.half,
                                     replace_with_kernel_inject=True, gpu_memory_utilization=0.5)
    del hf
    torch.cuda.empty_cache()
    ids = reference["prompts"]
    logits = engine.module(torch.tensor(ids)).logits
    tokens = [o.outputs[0].token_ids for o in engine.generate(ids, max_new_tokens=32, ignore_eos=True)]
    full = timed(lambda: engine.generate([ids[0]], max_new_tokens=128, ignore_eos=True))
    half = timed(lambda: engine.generate([ids[0]], max_new_tokens=64, ignore_eos=True))
    if rank == 0:
        result = {"tp": tp, "device": torch.cuda.get_device_name(), "decode_ms_per_step_bs1": (full - half) / 64 * 1e3,
                  "logits": logits, "tokens": tokens}
        torch.save(result, os.path.join(out, f"tp{tp}.pt"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--out", default="/tmp")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(7)
    reference = {"prompts": torch.randint(100, 50000, (4, 32), generator=g).tolist()}
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    for tp in (1, args.tp):
        mp.spawn(run, args=(tp, 29500 + tp, args.out, reference), nprocs=tp, join=True)
    one, many = (torch.load(os.path.join(args.out, f"tp{t}.pt")) for t in (1, args.tp))
    rel = ((many["logits"] - one["logits"]).abs().max() / one["logits"].abs().max()).item()
    match = sum(a == b for x, y in zip(one["tokens"], many["tokens"]) for a, b in zip(x, y)) / (4 * 32)
    summary = {"device": one["device"], "tp": args.tp, "date": time.strftime("%Y-%m-%d"),
               "logits_rel_err_tp_vs_tp1_fp16": rel, "greedy_token_match_32": match,
               "decode_ms_bs1": {1: one["decode_ms_per_step_bs1"], args.tp: many["decode_ms_per_step_bs1"]}}
    print(json.dumps(summary))
    with open(os.path.join(args.out, f"tp-spmd-{args.tp}.json"), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
