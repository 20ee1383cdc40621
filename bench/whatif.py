"""What a GPT-Neo 2.7B decode step (CUDA-graph replay, random weights) would take with one part
changed, every variant's graphs recaptured and the replays alternated so drift hits them all alike.
The default variants are upper bounds, not results: the norm kernels or the attention kernels
swapped for identities (the numbers they compute are wrong, the kernels around them the same).
"unsplit" runs the one- and two-row products of the shipped table without their K splits (so no
reduction kernel after them); "table" (with --table PATH) looks the products' tiles up in another
gemv table (bench/tune.py --refine-rows writes one) before the shipped one; "float head" (with a
`+head` dtype, e.g. int8+head) multiplies the float LM head instead of its quantized copy; "norm 1 warp"
and "norm 2 warps" run the norm kernels' programs with fewer warps (kernels.norm.NORM_WARPS); "out whole",
"out 8", "down 0" change how much of the attention output projection's or MLP down's weight their
programs ask the L2 for before their PDL wait (`l2_by_role`); "norm kernels" runs every norm as a kernel
of its own instead of inside the products after it (kernels.linear.FOLD_NORMS), "norm weight in W" those
products as if the norm's weight were in their weights (no x * g; right here, where it is 1); --configs compares
decode attention configurations (RAYSPEED_DECODE_CONFIG; "default": the built-in choice) instead, at
each context of --context.

    python3 bench/whatif.py --dtypes int8,float16,int4 [--batch 1] [--context 38] [--out bench/results]
    python3 bench/whatif.py --variants "as built,unsplit" --dtypes int4 --context 100
    python3 bench/whatif.py --configs "64,early,4 64,early-l2,4" --context 150
    python3 bench/whatif.py --variants "as built,table" --table /tmp/refined/<GPU table>.json --dtypes int4
    python3 bench/whatif.py --variants "as built,float head" --dtypes int8+head,int4+head --context 130
"""
import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rayspeed  # noqa: E402
import kernels.block as block  # noqa: E402
import kernels.gemv as gemv  # noqa: E402
import kernels.gemv_tuner as gemv_tuner  # noqa: E402
import kernels.linear as linear  # noqa: E402
import kernels.norm as norm_kernels  # noqa: E402
from actors.sequence import SamplingParams  # noqa: E402
from bench.decode import build, commit, dtype_args  # noqa: E402
from bench.output import write  # noqa: E402
from bench.step_breakdown import replay_ms  # noqa: E402

REAL_NORM, REAL_ATTENTION, REAL_TILE = block.Norm.forward, block.attention, gemv_tuner.tuned_tile
REAL_L2 = gemv._l2_prefetch_bytes
REAL_CHOICES = gemv_tuner._choices
REAL_NORM_WARPS = norm_kernels.NORM_WARPS
REAL_PREPARED_FOLD = linear._Linear._prepared_fold


def fold_weight_in_w(self, norm):
    """`_prepared_fold` with the norm's weight taken as already in W: the products skip x * g. Right
    only where the norm weights are 1, as in these random-weight models (HF initialises them so)."""
    fold = REAL_PREPARED_FOLD(self, norm)
    return None if fold is None else replace(fold, norm=replace(fold.norm, weight=None))


def no_norm(self, x, residual=None):
    return x if residual is None else (x, x)


def no_attention(q, k, v, *args, **kwargs):
    return q


def unsplit_tile(x, *args, **kwargs):
    tile = REAL_TILE(x, *args, **kwargs)
    few_rows = x.numel() // x.shape[-1] <= 2
    return replace(tile, split_k=1) if few_rows and isinstance(tile, gemv_tuner.Tile) and tile.split_k > 1 else tile


def l2_by_role(**mb):
    """A `_l2_prefetch_bytes` asking the L2 for `mb[role]` MB (whole chunks, at most the weight) of a
    product by its place in a block: "out" (square: the attention output projection, after attention),
    "down" (K > N: MLP down, after MLP up), anything else as built (RAYSPEED_L2_PREFETCH_MB)."""
    def l2_bytes(weight, bits):
        n, k = weight.shape[0], weight.shape[1] * (2 if bits == 4 else 1)
        role = "out" if n == k else "down" if k > n else None
        if role not in mb or REAL_L2(weight, bits) == 0:
            return REAL_L2(weight, bits)
        nbytes = min(int(mb[role] * 2**20), weight.numel() * weight.element_size())
        return nbytes // gemv.L2_CHUNK * gemv.L2_CHUNK
    return l2_bytes


VARIANTS = {"as built": {}, "no norms": {"norm": no_norm}, "no attention": {"attention": no_attention},
            "neither": {"norm": no_norm, "attention": no_attention}, "unsplit": {"tile": unsplit_tile},
            "float head": {"float_head": True}, "norm 1 warp": {"norm_warps": 1}, "norm 2 warps": {"norm_warps": 2},
            "out whole": {"l2": l2_by_role(out=16)}, "down 0": {"l2": l2_by_role(down=0)},
            "out whole+down 0": {"l2": l2_by_role(out=16, down=0)}, "out 8": {"l2": l2_by_role(out=8)},
            "norm kernels": {"fold": False}, "norm weight in W": {"weight_in_w": True}}


def _stem(path: str) -> str:
    return os.path.basename(path).removesuffix(".json")


def table_choices(path: str) -> gemv_tuner._Choices:
    """The tuner's choices with the table at `path` read over the shipped one (keys it lacks stay)."""
    choices = gemv_tuner._Choices()
    choices.disk = choices._read(torch.cuda.get_device_name())
    with open(path) as f:
        choices.disk.update(json.load(f))
    return choices


def use(model=None, norm=REAL_NORM, attention=REAL_ATTENTION, tile=REAL_TILE, config: str | None = None,
        choices=REAL_CHOICES, float_head: bool = False, l2=REAL_L2, norm_warps: int = REAL_NORM_WARPS,
        fold: bool = True, weight_in_w: bool = False) -> None:
    block.Norm.forward, block.attention, gemv_tuner.tuned_tile = norm, attention, tile
    linear.FOLD_NORMS = fold
    linear._Linear._prepared_fold = fold_weight_in_w if weight_in_w else REAL_PREPARED_FOLD
    norm_kernels.NORM_WARPS = norm_warps
    gemv._l2_prefetch_bytes = l2
    if model is not None and model.head_quant is not None:    # the quantized head copy, hidden or back
        if float_head and model.head_qweight is not None:
            model.hidden_head, model.head_qweight = model.head_qweight, None
        elif not float_head and model.head_qweight is None:
            model.head_qweight = model.hidden_head
    gemv_tuner._choices = choices
    if config:
        os.environ["RAYSPEED_DECODE_CONFIG"] = config
    else:
        os.environ.pop("RAYSPEED_DECODE_CONFIG", None)


def folded_blocks(model, batch: int) -> int:
    """How many decoder blocks run with their norms inside the products at this batch (`_folds`)."""
    blocks = [m for m in model.modules() if isinstance(m, block.DecoderBlock)]
    x = torch.zeros(batch, blocks[0].attn_norm.weight.shape[0],
                    dtype=blocks[0].attn_norm.weight.dtype, device="cuda")
    return sum(b._folds(x) is not None for b in blocks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="int8,float16,int4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", default="38", help="tokens in each sequence's cache when timed (a comma list: "
                                                    "timed at each in turn, the sequences decoding on between)")
    ap.add_argument("--variants", default="as built,no norms,no attention,neither", help=f"of {list(VARIANTS)}")
    ap.add_argument("--configs", default="", help="space-separated RAYSPEED_DECODE_CONFIG values to compare")
    ap.add_argument("--table", default="", help="the gemv table of the `table` variant; several, comma-separated: "
                                                "variants `table-<file name without .json>` each")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    tables = [t for t in args.table.split(",") if t]
    if len(tables) == 1:
        VARIANTS["table"] = {"choices": table_choices(tables[0])}
    for path in tables if len(tables) > 1 else []:
        VARIANTS[f"table-{_stem(path)}"] = {"choices": table_choices(path)}
    if len(tables) > 1 and "table" in args.variants.split(","):
        args.variants = ",".join([v for v in args.variants.split(",") if v != "table"] +
                                 [f"table-{_stem(p)}" for p in tables])
    contexts = [int(c) for c in args.context.split(",")]
    hf = build("neo")
    rows = {}
    for name in args.dtypes.split(","):
        engine = rayspeed.init_inference(hf, **dtype_args(name), replace_with_kernel_inject=True, kv_cache_blocks=1024,
                                         max_num_seqs=max(8, args.batch)).backend
        params = SamplingParams(max_new_tokens=900, ignore_eos=True)
        seqs = [engine.add_request(list(range(100 + i, 132 + i)), params) for i in range(args.batch)]
        variants = ({c: {"config": None if c == "default" else c} for c in args.configs.split()} or
                    {v: VARIANTS[v] for v in args.variants.split(",")})
        for context in contexts:
            while len(seqs[0]) < context:             # prefill, then decode steps
                engine.step()
            times, folds = {v: [] for v in variants}, {}
            for _ in range(args.rounds):
                for variant, patches in variants.items():
                    use(engine.runner.model, **patches)
                    engine.runner.capture_cudagraphs(engine.config.max_num_seqs, engine.max_seq_len)
                    times[variant].append(replay_ms(engine.runner, seqs, iters=200))
                    folds.setdefault(variant, folded_blocks(engine.runner.model, args.batch))
            use(engine.runner.model)
            key = name if len(contexts) == 1 else f"{name}@{context}"
            rows[key] = {v: statistics.median(t) for v, t in times.items()}
            rows[key]["all"], rows[key]["blocks_with_folded_norms"] = times, folds
            print(key, json.dumps({v: round(t, 4) for v, t in rows[key].items() if v in times}), "folded blocks", folds,
                  flush=True)
        for seq in seqs:
            engine.abort(seq)
        del engine
        torch.cuda.empty_cache()
    what = ("decode graph replay ms by RAYSPEED_DECODE_CONFIG" if args.configs else "decode graph replay ms: "
            "as built, with the norms and/or attention swapped for identities (upper bounds of their cost, wrong "
            "numbers), or with the one- and two-row products unsplit")
    result = {"device": torch.cuda.get_device_name(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
              "model": "neo", "batch": args.batch, "context": contexts if len(contexts) > 1 else contexts[0], "what": what,
              "ms": rows}
    tag = "configs" if args.configs else "tables" if len(tables) > 1 else \
        args.variants.replace(" ", "_").replace(",", "-")
    write(result, args.out, f"whatif-bs{args.batch}-ctx{args.context.replace(',', '_')}-{tag}", indent=1)


if __name__ == "__main__":
    main()
