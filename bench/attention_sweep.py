"""Fresh-prefill attention on the GPU: the varlen Triton kernel (`prefill_attention_triton`, one launch
for the batch) against torch SDPA per sequence (`prefill_attention_sdpa`: flash where no mask is
needed), on GPT-Neo 2.7B's (32 heads x 80, local layers with a 256 window) and Llama-2-7B's
(32 x 128) attention shapes. Also checks the two agree.

    python3 bench/attention_sweep.py --out bench/results
"""
import argparse
import datetime
import json
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.decode import commit  # noqa: E402
from kernels.prefill_attention import prefill_attention_sdpa, prefill_attention_triton  # noqa: E402

CASES = [  # (name, heads, head_dim, window, batch, length)
    ("neo.global", 32, 80, None, 1, 512), ("neo.local", 32, 80, 256, 1, 512), ("neo.global", 32, 80, None, 32, 32),
    ("neo.local", 32, 80, 256, 8, 128), ("neo.global", 32, 80, None, 4, 2048), ("llama", 32, 128, None, 1, 512),
    ("llama", 32, 128, None, 32, 32), ("llama", 32, 128, None, 1, 4096)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    rows = []
    for name, heads, dim, window, batch, length in CASES:
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
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(), "commit": commit(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "rows": rows}
    path = os.path.join(args.out, f"{torch.cuda.get_device_name().replace(' ', '-')}-{result['date']}-attention.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
