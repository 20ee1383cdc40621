"""Attention kernels on the GPU. Fresh prefill: the varlen Triton kernel (`prefill_attention_triton`,
one launch for the batch) against torch SDPA per sequence (`prefill_attention_sdpa`: flash where no
mask is needed), on GPT-Neo 2.7B's (20 heads x 128, local layers with a 256 window) and Llama-2-7B's
(32 x 128) attention shapes; also checks the two agree. `--decode`: paged decode attention with its
context split over several programs per (head, sequence) (the default where the grid is small)
against one program each, batch 1 to 32, contexts 160 to 8,192, timed in CUDA graphs as decode
runs it, over cache copies that miss L2; `--decode-configs`: every chunk size, chunk-read mode and
warp count against the default choice (and context splits, `--splits 1,2,4`).

    python3 bench/attention_sweep.py [--decode | --decode-configs | --store | --sdpa-graph] --out bench/results
"""
import argparse
import datetime
import itertools
import json
import os
import sys
from unittest import mock

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.decode import commit  # noqa: E402
from kernels.attention import paged_decode_attention_triton  # noqa: E402
from kernels.decode_plan import DECODE_MODES, decode_splits  # noqa: E402
from kernels.gemv_tuner import time_in_graph  # noqa: E402
from kernels.prefill_attention import prefill_attention_sdpa, prefill_attention_triton  # noqa: E402

CASES = [  # (name, heads, head_dim, window, batch, length)
    ("neo.global", 20, 128, None, 1, 512), ("neo.local", 20, 128, 256, 1, 512), ("neo.global", 20, 128, None, 32, 32),
    ("neo.local", 20, 128, 256, 8, 128), ("neo.global", 20, 128, None, 4, 2048), ("llama", 32, 128, None, 1, 512),
    ("llama", 32, 128, None, 32, 32), ("llama", 32, 128, None, 1, 4096)]
DECODE_CASES = [(heads, batch, ctx) for heads in (20, 32) for batch in (1, 8, 32) for ctx in (160, 1024, 8192)]


def decode_rows():
    """Decode attention (20 or 32 heads of 128, fp16, block 16) with and without context splitting."""
    for heads, batch, ctx in DECODE_CASES:
        kv_bytes = 2 * batch * ctx * heads * 128 * 2
        launch, copies = decode_cache(heads, batch, ctx)
        splits = decode_splits(heads * batch, torch.device("cuda"))
        split_us = _timed_with({}, launch, copies)
        single_us = _timed_with({"RAYSPEED_DECODE_SPLITS": "1"}, launch, copies)
        yield {"heads": heads, "batch": batch, "context": ctx, "splits": splits, "split_us": split_us,
               "one_program_us": single_us, "kv_gb_per_s": kv_bytes / (split_us * 1e3)}


def decode_cache(heads: int, batch: int, ctx: int, max_context: int | None = None):
    """(launch(i), copies): decode attention over the i-th of enough fp16 cache copies (block 16) that
    each launch reads its keys and values from HBM; `max_context` as the decode graphs pass it (256 in
    the graphs of steps whose contexts all fit 256 positions)."""
    block = 16
    blocks_per_seq = -(-ctx // block)
    kv_bytes = 2 * batch * ctx * heads * 128 * 2
    copies = max(1, min(8, -(-100 * 2**20 // kv_bytes)))
    caches = [torch.randn(2, batch * blocks_per_seq, block, heads, 128, device="cuda", dtype=torch.float16)
              for _ in range(copies)]
    tables = torch.arange(batch * blocks_per_seq, dtype=torch.int32, device="cuda").view(batch, blocks_per_seq)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, 128, device="cuda", dtype=torch.float16)
    return (lambda i: paged_decode_attention_triton(q, caches[i][0], caches[i][1], tables, lens, 0.088,
                                                    max_context=max_context)), copies


def _timed_with(env: dict, launch, copies: int) -> float:
    """time_in_graph's microseconds with `env` set for the call."""
    with mock.patch.dict(os.environ, env):
        return time_in_graph(launch, copies) * 1e3


def decode_config_rows(batches: list[int], contexts: list[int], splits: list[str]):
    """Decode attention (GPT-Neo's 20 heads) at each batch and context: the default chunk / mode /
    warps against every combination (RAYSPEED_DECODE_CONFIG), at each context split setting
    (RAYSPEED_DECODE_SPLITS; "auto": the default). Contexts up to 256 pass max_context=256, as the
    short-context decode graphs do."""
    for batch in batches:
        for ctx in contexts:
            launch, copies = decode_cache(20, batch, ctx, 256 if ctx <= 256 else None)
            row = {"heads": 20, "batch": batch, "context": ctx, "kv_mb": 2 * batch * ctx * 20 * 256 / 2**20,
                   "default_us": _timed_with({}, launch, copies), "configs": {}}
            for split in splits:
                for chunk in (16, 32, 64):
                    for mode in DECODE_MODES:
                        for warps in (2, 4, 8):
                            config = f"{chunk},{mode},{warps}"
                            env = {"RAYSPEED_DECODE_CONFIG": config}
                            if split != "auto":
                                env["RAYSPEED_DECODE_SPLITS"] = split
                            name = config if split == "auto" else f"{config},split{split}"
                            row["configs"][name] = _timed_with(env, launch, copies)
            best = min(row["configs"], key=row["configs"].get)
            row["best"] = [best, row["configs"][best]]
            yield row


def prefill_configs(q, k, v, cu, length, scale, window) -> dict:
    """The Triton prefill kernel's time (us, back to back in a CUDA graph, its inputs in L2 as after
    the QKV product) at each launch configuration: query rows, keys a step, warps, stages; None where
    it fails to build."""
    times = {}
    for rows, keys, warps, stages in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3)):
        if rows == 32 and (warps == 8 or keys == 128):
            continue
        launch = lambda i: prefill_attention_triton(q, k, v, cu, length, scale, window, block=rows,  # noqa: E731
                                                    block_n=keys, num_warps=warps, num_stages=stages)
        try:
            us = time_in_graph(launch, 1) * 1e3
        except Exception:                     # out of shared memory or registers at this size
            us = None
        times[f"{rows},{keys},{warps},{stages}"] = us
    return times


def stored_us(q, k, v, cu, length, scale, window) -> float:
    """The prefill kernel (us, back to back in a CUDA graph) writing the keys and values to a paged
    cache as it does in the model."""
    tokens, kv_heads, dim = k.shape
    k_cache, v_cache = (torch.empty(tokens // 16 + 1, 16, kv_heads, dim, device="cuda", dtype=k.dtype) for _ in "kv")
    slots = torch.arange(tokens, device="cuda")
    return time_in_graph(lambda i: prefill_attention_triton(q, k, v, cu, length, scale, window, None, k_cache, v_cache,
                                                            slots), 1) * 1e3


SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")


def sdpa_backends_us(q, k, v, length, scale, window) -> dict:
    """One prompt's prefill attention through each SDPA backend (us, back to back in a CUDA graph, the
    keys and values stored to a paged cache by `store_kv` beside it, as the Triton kernel stores them):
    q, k, v views of one [tokens, 3 heads, dim] tensor as the model has them; a window shorter than
    the prompt as a boolean mask (the flash backend takes none: None there). None: the backend
    refused the case."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from kernels.attention_torch import store_kv
    tokens, kv_heads, dim = k.shape
    k_cache, v_cache = (torch.empty(tokens // 16 + 1, 16, kv_heads, dim, device="cuda", dtype=k.dtype) for _ in "kv")
    slots = torch.arange(tokens, device="cuda")
    mask = None
    if window is not None and window < length:
        pos = torch.arange(length, device="cuda")
        rel = pos[None, :] - pos[:, None]
        mask = (rel <= 0) & (rel > -window)
    qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))          # [1, heads, len, dim] views

    def run(i):
        store_kv(k, v, k_cache, v_cache, slots)
        return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None,
                                                                scale=scale)
    out = {}
    for name in SDPA_BACKENDS:
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                out[name] = time_in_graph(run, 1) * 1e3
        except RuntimeError as e:
            out[name] = None
            print(f"{name}: {str(e).splitlines()[0][:200]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--decode", action="store_true", help="decode attention, split context vs one program")
    ap.add_argument("--decode-configs", action="store_true",
                    help="decode attention: every chunk / mode / warps against the default")
    ap.add_argument("--batches", default="8,32", help="--decode-configs: batch sizes")
    ap.add_argument("--contexts", default="96,160,512", help="--decode-configs: context lengths")
    ap.add_argument("--splits", default="auto", help="--decode-configs: RAYSPEED_DECODE_SPLITS values (auto: unset)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--store", action="store_true",
                    help="prefill: also time the kernel storing the keys and values to a paged cache, in a graph")
    ap.add_argument("--sdpa-graph", action="store_true",
                    help="prefill: also time each SDPA backend in a graph (keys and values stored beside it)")
    ap.add_argument("--configs", action="store_true",
                    help="prefill: also time the Triton kernel at every block / warps / stages")
    args = ap.parse_args()
    rows = []
    if args.decode or args.decode_configs:
        ints = lambda text: [int(v) for v in text.split(",")]                  # noqa: E731
        configs = decode_config_rows(ints(args.batches), ints(args.contexts), args.splits.split(","))
        for row in (configs if args.decode_configs else decode_rows()):
            rows.append(row)
            print(json.dumps(row), flush=True)
    for name, heads, dim, window, batch, length in ([] if args.decode or args.decode_configs else CASES):
        tokens = batch * length
        qkv = torch.randn(tokens, 3 * heads, dim, device="cuda", dtype=torch.float16)
        q, k, v = qkv[:, :heads], qkv[:, heads:2 * heads], qkv[:, 2 * heads:]
        cu_host = [i * length for i in range(batch + 1)]
        cu = torch.tensor(cu_host, dtype=torch.int32, device="cuda")
        scale = 1.0 if name.startswith("neo") else dim ** -0.5
        triton_fn = lambda: prefill_attention_triton(q, k, v, cu, length, scale, window)   # noqa: E731
        sdpa_fn = lambda: prefill_attention_sdpa(q, k, v, cu_host, scale, window)         # noqa: E731
        err = ((triton_fn().float() - sdpa_fn().float()).norm() / sdpa_fn().float().norm()).item()
        row = {"case": name, "heads": heads, "head_dim": dim, "window": window, "batch": batch, "length": length,
               "triton_us": do_bench(triton_fn) * 1e3, "sdpa_us": do_bench(sdpa_fn) * 1e3, "rel_err": err}
        if args.store or args.sdpa_graph:
            row["stored_in_graph_us"] = stored_us(q, k, v, cu, length, scale, window)
        if args.sdpa_graph and batch == 1:
            row["sdpa_stored_in_graph_us"] = sdpa_backends_us(q, k, v, length, scale, window)
        if args.configs and batch * length <= 4096:
            row["configs"] = prefill_configs(q, k, v, cu, length, scale, window)
            row["default_in_graph_us"] = time_in_graph(lambda i: triton_fn(), 1) * 1e3
            built = {c: us for c, us in row["configs"].items() if us is not None}
            row["best"] = min(built, key=built.get)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(), "commit": commit(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "rows": rows}
    path = os.path.join(args.out, f"{torch.cuda.get_device_name().replace(' ', '-')}-{result['date']}-"
                        f"{'decode-configs-' if args.decode_configs else 'decode-' if args.decode else ''}attention"
                        f"{args.tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
