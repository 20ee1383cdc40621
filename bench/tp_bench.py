"""Tensor parallelism on the GPUs of one host, without Ray: for GPT-Neo 2.7B and a Llama-2-7B-shaped
config (random weights, fp16), TP = 1 and N (N = the visible GPUs), one process per rank
(torch.multiprocessing, with the launcher's env, so `init_inference` joins an NCCL group as under
`rayspeed --num_gpus N`). Reports fp16 logits vs TP=1 and vs an HF fp32 reference (computed once in
the parent, before the ranks start), greedy agreement, load time and decode ms/step at batch 1, 8, 32
(difference of 128- and 64-token runs, medians; see bench/decode.py).

    python3 bench/tp_bench.py --models neo,llama --out bench/results
    RAYSPEED_SYMM_ALLREDUCE=1 is timed as a second TP=N variant when --symm is given.
Writes <out>/<device>x<N>-<date>-tp.json with the device, commit ($RAYSPEED_COMMIT without git), date.
"""
import argparse
import datetime
import faulthandler
import gc
import json
import os
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.decode import build, commit, decode_ms  # noqa: E402
from bench.output import write  # noqa: E402

NUM_PROMPTS, PROMPT, GREEDY = 4, 32, 32
STALL_S = float(os.environ.get("TP_BENCH_STALL_S", "120"))     # each rank dumps its threads' stacks this often


def reference(model: str, path: str) -> dict:
    """HF fp32 logits and greedy tokens (and HF fp16's, the noise floor) for a few prompts, saved to `path`."""
    hf = build(model)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(100, hf.config.vocab_size - 100, (NUM_PROMPTS, PROMPT), generator=g)
    greedy = lambda: hf.generate(ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), max_new_tokens=GREEDY,
                                 min_new_tokens=GREEDY, do_sample=False, pad_token_id=0)[:, PROMPT:].cpu()
    with torch.no_grad():
        fp16 = {"logits": hf(ids.cuda()).logits.float().cpu(), "tokens": greedy()}
        hf.float()
        fp32 = {"logits": hf(ids.cuda()).logits.cpu(), "tokens": greedy()}
    ref = {"prompts": ids, "fp32": fp32, "fp16": fp16}
    torch.save(ref, path)
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return ref


def rank_main(rank: int, tp: int, port: int, model: str, ref_path: str, out_path: str, batches: list[int],
              env: dict) -> None:
    """One rank: build, shard and load; logits and greedy tokens for the reference prompts; decode timings."""
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(tp), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import rayspeed
    faulthandler.dump_traceback_later(STALL_S, repeat=True)      # a stalled rank shows where, every STALL_S
    t0 = time.perf_counter()
    stage = lambda what: print(f"tp{tp} rank {rank}: {what} at {time.perf_counter() - t0:.1f} s", flush=True)
    torch.cuda.set_device(rank)                    # build this rank's HF copy on its own GPU
    ids = torch.load(ref_path)["prompts"]
    hf = build(model)
    stage("built")
    vocab = hf.config.vocab_size
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine = rayspeed.init_inference(hf, tensor_parallel={"tp_size": tp}, dtype=torch.half,
                                     replace_with_kernel_inject=True, gpu_memory_utilization=0.5)
    load_s = time.perf_counter() - start
    stage("loaded")
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    with torch.no_grad():
        logits = engine.module(ids).logits.float().cpu()
    stage("logits")
    out = engine.generate(ids.tolist(), max_new_tokens=GREEDY, ignore_eos=True)
    tokens = torch.tensor([o.outputs[0].token_ids for o in out])
    stage("greedy tokens")
    run = lambda prompt_ids, new: engine.generate(prompt_ids.tolist(), max_new_tokens=new, ignore_eos=True)
    decode = {}
    for batch in batches:
        ms, ttft = decode_ms(run, batch, vocab)
        decode[batch] = {"decode_ms_per_step": ms, "tok_per_s": batch * 1e3 / ms, "prefill_ms": ttft}
        stage(f"batch {batch}: {ms:.3f} ms a step")
    if rank == 0:
        torch.save({"load_s": load_s, "logits": logits, "tokens": tokens, "decode": decode}, out_path)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).float().mean().item()


def bench_model(model: str, sizes: list[tuple[int, dict]], batches: list[int], tmp: str) -> dict:
    """Reference in this process, then each (tp, env) variant in its own set of rank processes."""
    ref_path = os.path.join(tmp, f"{model}-ref.pt")
    ref = reference(model, ref_path)
    runs = {}
    for i, (tp, env) in enumerate(sizes):
        name = f"tp{tp}" + ("-symm" if env.get("RAYSPEED_SYMM_ALLREDUCE") == "1" else "")
        out_path = os.path.join(tmp, f"{model}-{name}.pt")
        start = time.perf_counter()
        try:
            mp.spawn(rank_main, args=(tp, 29400 + 10 * i + tp, model, ref_path, out_path, batches, env),
                     nprocs=tp, join=True)
        except Exception as e:                  # noqa: BLE001  (a failed variant is reported, the rest runs)
            runs[name] = {"error": str(e)[-2000:]}
            print(model, name, "failed after", round(time.perf_counter() - start, 1), "s:", str(e)[-2000:], flush=True)
            continue
        runs[name] = torch.load(out_path) | {"wall_s": time.perf_counter() - start}
        print(model, name, json.dumps(runs[name]["decode"]), flush=True)
    one = runs["tp1"]
    result = {"hf_fp16_vs_hf_fp32": {"logits_rel_err": rel_err(ref["fp16"]["logits"], ref["fp32"]["logits"]),
                                     "greedy_match": agreement(ref["fp16"]["tokens"], ref["fp32"]["tokens"])}}
    for name, r in runs.items():
        if "error" in r:
            result[name] = r
            continue
        result[name] = {
            "load_s": r["load_s"], "wall_s": r["wall_s"], "decode": r["decode"],
            "logits_rel_err_vs_hf_fp32": rel_err(r["logits"], ref["fp32"]["logits"]),
            "logits_rel_err_vs_tp1": rel_err(r["logits"], one["logits"]),
            "greedy_match_vs_hf_fp32": agreement(r["tokens"], ref["fp32"]["tokens"]),
            "greedy_match_vs_tp1": agreement(r["tokens"], one["tokens"]),
            "decode_ms_vs_tp1": {b: r["decode"][b]["decode_ms_per_step"] / one["decode"][b]["decode_ms_per_step"]
                                 for b in batches}}
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="neo,llama")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--tp", type=int, default=torch.cuda.device_count(), help="TP degree besides 1")
    ap.add_argument("--symm", action="store_true", help="also time TP=N with RAYSPEED_SYMM_ALLREDUCE=1")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    for key, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                       ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(key, value)         # NVLink multicast stays off (shared host)
    batches = [int(b) for b in args.batches.split(",")]
    base = {"RAYSPEED_SYMM_ALLREDUCE": "0"}
    sizes = [(1, base)] + ([(args.tp, base)] if args.tp > 1 else [])
    if args.symm and args.tp > 1:
        sizes.append((args.tp, {"RAYSPEED_SYMM_ALLREDUCE": "1"}))
    device = torch.cuda.get_device_name()
    result = {"bench": "tp", "device": device, "gpus": torch.cuda.device_count(), "tp": args.tp,
              "commit": commit(), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "prompt": PROMPT, "batches": batches, "models": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            result["models"][model] = bench_model(model, sizes, batches, tmp)
            result["wall_s"] = time.perf_counter() - start
            print(json.dumps(result["models"][model], indent=2))
            write(result, args.out, "tp", device=f"{device}x{args.tp}")    # after each model: a timeout keeps it


if __name__ == "__main__":
    main()
