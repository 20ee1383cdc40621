"""Decode speed, side by side in one process on one GPU: HF transformers eager `generate` vs
rayspeed (`init_inference(..., replace_with_kernel_inject=True)`, `engine.generate`), same random
weights, fp16, prompt 32 tokens, 128 new tokens, greedy. Also checks correctness on the GPU
(fp16 logits vs an fp32 HF reference; greedy agreement over 64 tokens) and reports load time
and time to first token.

    python3 bench/decode.py --model neo --batches 1,8,32 --out bench/results
Writes <out>/<device>-<date>-<model>.json with the device, commit and date.
"""
import argparse
import datetime
import fcntl
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rayspeed  # noqa: E402
from bench.output import write  # noqa: E402

PROMPT, NEW = 32, 128
KV_BLOCKS = {"neo": 4096, "llama": 1024}       # fixed, so several engines fit beside the HF model


def build(model: str, vocab_size: int | None = None):
    """Random-weight fp16 HF model: GPT-Neo 2.7B or a Llama-2-7B-shaped config (`vocab_size`: another
    vocabulary than the model's own)."""
    import transformers as tf
    if model == "neo":
        config = tf.GPTNeoConfig(hidden_size=2560, num_layers=32, num_heads=20, vocab_size=vocab_size or 50257,
                                 max_position_embeddings=2048, window_size=256,
                                 attention_types=[[["global", "local"], 16]])
        cls = tf.GPTNeoForCausalLM
    else:
        config = tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=vocab_size or 32000,
                                max_position_embeddings=4096)
        cls = tf.LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = cls(config).half().eval()
    return hf


def timed(fn, repeats: int = 3, inputs=tuple) -> float:
    """Median seconds of `fn(*inputs())` after a warm-up; the inputs are made before the clock starts."""
    fn(*inputs())
    times = []
    for _ in range(repeats):
        args = inputs()
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn(*args)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prompts(batch: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, PROMPT), generator=g).cuda()


def decode_ms(run, batch: int, vocab: int, lists: bool = False) -> tuple[float, float]:
    """(ms per decode step, time to first token in ms): decode from the difference of a 128- and a
    64-token run (both pay the same prefill), TTFT from a 1-token run; fresh prompts each time (a
    tensor on the GPU, or with `lists` token lists, made before the clock starts)."""
    seed = iter(range(10**6))
    def fresh():
        ids = prompts(batch, vocab, next(seed))
        return (ids.tolist() if lists else ids,)
    full = timed(lambda ids: run(ids, NEW), inputs=fresh)
    half = timed(lambda ids: run(ids, NEW // 2), inputs=fresh)
    first = timed(lambda ids: run(ids, 1), inputs=fresh)
    return (full - half) / (NEW - NEW // 2) * 1e3, first * 1e3


def hf_run(hf):
    def run(ids, new):
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                    do_sample=False, pad_token_id=0)
    return run


def rs_run(engine, **sampling):
    def run(ids: list[list[int]], new):
        engine.generate(ids, max_new_tokens=new, ignore_eos=True, **sampling)
    return run


SAMPLED = dict(do_sample=True, temperature=0.8, top_k=50)


def hf_greedy(hf, ids, new: int = 64) -> torch.Tensor:
    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)[:, PROMPT:]


def ours_greedy(engine, ids, new: int = 64) -> torch.Tensor:
    out = engine.generate(ids.tolist(), max_new_tokens=new, ignore_eos=True)
    return torch.tensor([o.outputs[0].token_ids for o in out]).cuda()


def agreement(got: list[list[int]], expected: list[list[int]]) -> dict:
    """How far two runs' generated tokens agree: the fraction of equal tokens, and the first step at
    which any sequence differs (a rounding flip of near-tied logits diverges late and then everywhere)."""
    pairs = list(zip(got, expected))
    equal = sum(a == b for g, e in pairs for a, b in zip(g, e))
    first = [next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), len(e)) for g, e in pairs]
    return {"token_match": equal / max(1, sum(len(e) for e in expected)), "first_diverging_step": min(first, default=0)}


def correctness(hf, engine, vocab: int) -> dict:
    """fp16 rayspeed vs fp32 HF logits; greedy agreement with HF fp16, and (the noise floor of
    random weights) HF fp16 with HF fp32; CUDA-graph decode and prefill vs eager, which must be equal
    (also on prompts of mixed lengths, which the prefill graphs pad)."""
    ids = prompts(8, vocab, 1234)
    with torch.no_grad():
        hf.float()
        reference, greedy_fp32 = hf(ids).logits, hf_greedy(hf, ids)
        hf.half()
        reference_fp16 = hf(ids).logits.float()
    got = engine.module(ids.cpu()).logits.cuda()
    rel = lambda a: ((a - reference).abs().max() / reference.abs().max()).item()
    expected, ours = hf_greedy(hf, ids), ours_greedy(engine, ids)
    mixed = [list(range(100, 100 + n)) for n in (5, 17, 40, 3, 64, 2)]
    mixed_tokens = lambda: [o.outputs[0].token_ids for o in engine.generate(mixed, max_new_tokens=16,  # noqa: E731
                                                                            ignore_eos=True)]
    graphed_mixed = mixed_tokens()
    prefill_gap = prefill_graph_gap(engine, mixed)
    runner = engine.backend.runner
    graphs, prefill_graphs = runner.graphs, runner.prefill_graphs
    runner.graphs = runner.prefill_graphs = None
    eager, eager_mixed = ours_greedy(engine, ids), mixed_tokens()
    runner.graphs, runner.prefill_graphs = graphs, prefill_graphs
    return {"logits_rel_err_fp16_vs_hf_fp32": rel(got), "hf_fp16_logits_rel_err_vs_hf_fp32": rel(reference_fp16),
            "greedy_token_match_64_vs_hf_fp16": (ours == expected).float().mean().item(),
            "hf_fp16_greedy_token_match_64_vs_hf_fp32": (expected == greedy_fp32).float().mean().item(),
            "cuda_graph_decode_equals_eager": bool(torch.equal(ours, eager)),
            "cuda_graphs_equal_eager_mixed_prompt_lengths": graphed_mixed == eager_mixed,
            "mixed_prompt_lengths_agreement": agreement(graphed_mixed, eager_mixed),
            "mixed_prompt_lengths_prefill_graph_vs_eager": prefill_gap,
            "cuda_graphs": graphs is not None, "prefill_graphs": prefill_graphs is not None}


def prefill_graph_gap(engine, prompts: list[list[int]]) -> dict:
    """Where a padded prefill graph and the eager forward disagree on prompts of mixed lengths: the
    largest relative difference of their last-token logits, how many prompts' argmax differs, and
    for those the eager top-2 gap next to the median top-2 gap (a flip of near-tied logits is rounding)."""
    from actors.sequence import SamplingParams, Sequence
    runner, manager = engine.backend.runner, engine.backend.block_manager
    if runner.prefill_graphs is None:
        return {}
    seqs = [Sequence(p, SamplingParams()) for p in prompts]
    for seq in seqs:
        manager.allocate(seq)
    try:
        ids, positions, meta = runner.prepare_prefill(seqs)
        graphed = runner.prefill_graphs.run(ids, positions, meta)
        if graphed is None:
            return {}
        graphed = graphed.float().clone()
        eager = runner._eager(ids, positions, meta, False).float()
    finally:
        for seq in seqs:
            manager.deallocate(seq)
    top2 = eager.topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1]).tolist()
    differs = (graphed.argmax(-1) != eager.argmax(-1)).tolist()
    return {"logits_max_rel_diff": ((graphed - eager).abs().max() / eager.abs().max()).item(),
            "argmax_differs": sum(differs), "top2_gap_where_argmax_differs": [g for g, d in zip(gaps, differs) if d],
            "median_top2_gap": statistics.median(gaps)}


def commit() -> str:
    """$RAYSPEED_COMMIT when set (device runs: their copy of .git, if any, may be stale), else git's HEAD."""
    if os.environ.get("RAYSPEED_COMMIT"):
        return os.environ["RAYSPEED_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def block_linear_bytes(engine) -> int:
    """Bytes of the injected blocks' linear weights (quantized: qweight + scales) on this rank."""
    model = engine.backend.runner.model
    return sum(p.numel() * p.element_size() for name, p in model.layers.named_parameters()
               if name.rsplit(".", 1)[-1] in ("weight", "qweight", "scales") and "norm" not in name)


def head_copy_bytes(engine) -> int:
    """Bytes of the LM head's quantized copy (quant.lm_head), 0 without one."""
    model = engine.backend.runner.model
    return sum(t.numel() * t.element_size() for t in (model.head_qweight, model.head_scales) if t is not None)


def dtype_args(variant: str) -> dict:
    """init_inference's arguments for a --dtypes entry: a dtype, or a quantized one + "head"."""
    dtype, _, head = variant.partition("+")
    if head not in ("", "head") or (head and dtype not in ("int8", "int4")):
        raise SystemExit(f"--dtypes: unknown variant {variant!r}")
    return {"dtype": dtype, **({"quant": {"lm_head": {"enabled": True}}} if head else {})}


def quality_vs(reference, engine, vocab: int) -> dict:
    """Logits error and greedy agreement of `engine` against the fp16 `reference` engine."""
    ids = prompts(8, vocab, 99)
    a, b = (e.module(ids.cpu()).logits.float() for e in (reference, engine))
    tokens = [ours_greedy(e, ids) for e in (reference, engine)]
    return {"logits_rel_err_vs_fp16": ((b - a).abs().max() / a.abs().max()).item(),
            "greedy_token_match_64_vs_fp16": (tokens[0] == tokens[1]).float().mean().item()}


def matmul_errors(engine, reference) -> dict:
    """Each quantized linear of layer 0 against the fp32 product with the fp16 weights it was
    quantized from (the `reference` engine's), on random activations: ||got - ref|| / ||ref||."""
    ours, theirs = engine.backend.runner.model.layers[0], reference.backend.runner.model.layers[0]
    out = {}
    for name in ("attn.qkv", "attn.out", "mlp.up", "mlp.down"):
        lin, ref_lin = ours.get_submodule(name), theirs.get_submodule(name)
        x = torch.randn(8, ref_lin.weight.shape[1], device="cuda", dtype=torch.half)
        ref = x.float() @ ref_lin.weight.float().T
        got = lin._matmul(x).float()
        out[name] = ((got - ref).norm() / ref.norm()).item()
    return out


def prefill_ms(engine, vocab: int, length: int = 512) -> float:
    seed = iter(range(10**6))
    fresh = lambda: (prompts(1, vocab, next(seed) + 500)[:, :1].repeat(1, length).tolist(),)    # noqa: E731
    return timed(lambda ids: engine.generate(ids, max_new_tokens=1, ignore_eos=True), repeats=20, inputs=fresh) * 1e3


def concurrent_tok_s(engine, vocab: int, requests: int) -> float:
    """Generated tokens per second with `requests` prompts in flight (continuous batching)."""
    ids = prompts(requests, vocab, 4242).tolist()
    engine.generate(ids[:8], max_new_tokens=8, ignore_eos=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.generate(ids, max_new_tokens=NEW, ignore_eos=True)
    torch.cuda.synchronize()
    return requests * NEW / (time.perf_counter() - t)


def main() -> None:
    global PROMPT
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["neo", "llama"], default="neo")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtypes", default="float16",
                    help="comma list of float16, bfloat16, int8, int4; int8+head, int4+head: with the LM head's "
                         "quantized copy (quant.lm_head)")
    ap.add_argument("--concurrent", type=int, default=0, help="also time this many requests in flight (fp16)")
    ap.add_argument("--no-hf", action="store_true", help="skip HF eager timings")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--prompt", type=int, default=PROMPT,
                    help="prompt tokens; other than 32, only the decode timings (a long-context check)")
    args = ap.parse_args()
    PROMPT, long_context = args.prompt, args.prompt != 32
    hf = build(args.model)
    vocab = hf.config.vocab_size
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    batches = [int(b) for b in args.batches.split(",")]
    result = {"model": args.model, "device": torch.cuda.get_device_name(), "commit": commit(),
              "date": datetime.date.today().isoformat(), "torch": torch.__version__, "prompt": PROMPT, "new": NEW,
              "weight_gb": weight_bytes / 1e9, "roof_ms": weight_bytes / 3.0e12 * 1e3, "hf_eager": {}, "variants": {}}
    if not args.no_hf and not long_context:
        for batch in batches:
            ms, first = decode_ms(hf_run(hf), batch, vocab)
            result["hf_eager"][batch] = {"decode_ms_per_step": ms, "tok_per_s": batch * 1e3 / ms, "ttft_ms": first}
            print("hf_eager", batch, json.dumps(result["hf_eager"][batch]), flush=True)
    reference = None
    for dtype in args.dtypes.split(","):
        t = time.perf_counter()
        engine = rayspeed.init_inference(hf, **dtype_args(dtype), replace_with_kernel_inject=True,
                                         kv_cache_blocks=KV_BLOCKS[args.model], max_num_seqs=max(64, args.concurrent),
                                         max_out_tokens=max(1024, PROMPT + NEW))
        row = {"load_s": time.perf_counter() - t, "block_linear_gb": block_linear_bytes(engine) / 1e9,
               "head_copy_gb": head_copy_bytes(engine) / 1e9,
               "prefill_512_ms": None if long_context else prefill_ms(engine, vocab), "batches": {}}
        if long_context:
            pass
        elif dtype in ("float16", "bfloat16") and reference is None:
            if dtype == "float16":
                row["correctness"] = correctness(hf, engine, vocab)
            reference = engine
        else:
            row["quality"] = quality_vs(reference, engine, vocab) if reference is not None else None
            if dtype_args(dtype)["dtype"] in ("int8", "int4") and reference is not None:
                row["matmul_rel_err_vs_fp32"] = matmul_errors(engine, reference)
        for batch in batches:
            ms, first = decode_ms(rs_run(engine), batch, vocab, lists=True)
            cell = {"decode_ms_per_step": ms, "tok_per_s": batch * 1e3 / ms, "ttft_ms": first}
            if batch in result["hf_eager"]:
                cell["speedup_vs_hf"] = result["hf_eager"][batch]["decode_ms_per_step"] / ms
            if dtype == "float16" and not long_context:    # sampled, without and with a seed per request
                cell["sampled_decode_ms_per_step"], _ = decode_ms(rs_run(engine, **SAMPLED), batch, vocab, lists=True)
                cell["seeded_sampled_decode_ms_per_step"], _ = decode_ms(rs_run(engine, **SAMPLED, seed=1234), batch,
                                                                         vocab, lists=True)
            row["batches"][batch] = cell
            print(dtype, batch, json.dumps(cell), flush=True)
        if args.concurrent and dtype == "float16":
            row[f"concurrent_{args.concurrent}_tok_s"] = concurrent_tok_s(engine, vocab, args.concurrent)
        result["variants"][dtype] = row
        print(dtype, json.dumps({k: v for k, v in row.items() if k != "batches"}), flush=True)
        save(result, args)                      # after each variant: a run cut short keeps what it measured
        if engine is not reference:
            engine.shutdown()
            del engine
        gc.collect()                            # whatever cycles still hold an engine's KV cache and graphs
        torch.cuda.empty_cache()
        print(f"after {dtype}: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated", flush=True)


def merge_tuned_table(device: str, out: str) -> int:
    """Merge this process's gemv tuner table (its $RAYSPEED_CACHE) into the one of the same name in
    `out`, under a lock (one process per GPU may do this at once; a copy would drop the entries of
    other runs or models). Returns how many choices the merged table holds."""
    from kernels.gemv_tuner import _Choices
    table = _Choices._path(device)
    if not os.path.exists(table):
        return 0
    os.makedirs(out, exist_ok=True)
    target = os.path.join(out, os.path.basename(table))
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = json.load(open(target)) if os.path.exists(target) else {}
        merged.update(json.load(open(table)))
        with open(target, "w") as f:
            json.dump(merged, f, indent=0)
    os.remove(target + ".lock")
    return len(merged)


def save(result: dict, args) -> None:
    fp16 = result["variants"].get("float16", {}).get("block_linear_gb")
    for dtype, row in result["variants"].items():
        if fp16:
            row["block_linear_bytes_vs_fp16"] = row["block_linear_gb"] / fp16
    os.makedirs(args.out, exist_ok=True)
    merge_tuned_table(result["device"], args.out)    # the tuner's table: commit it to kernels/tuned/ to ship it
    write(result, args.out, args.model + args.tag)


if __name__ == "__main__":
    main()
