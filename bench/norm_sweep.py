"""LayerNorm (GPT-Neo's 2,560 channels, bias, residual) and RMSNorm (Llama's 4,096, residual) at the
row counts decode and prefill give them, at every warp count: microseconds a call, back to back in a
CUDA graph as the model's steps run them (programmatic dependent launch included).

    python3 bench/norm_sweep.py --out bench/results
"""
import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.decode import commit  # noqa: E402
from kernels.gemv_tuner import time_in_graph  # noqa: E402
from kernels.norm import NORM_WARPS, layer_norm_triton, rms_norm_triton  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    rows_out = []
    for name, hidden in (("layer_norm", 2560), ("rms_norm", 4096)):
        w, b = (torch.randn(hidden, device="cuda", dtype=torch.half) for _ in range(2))
        for rows in (1, 8, 32, 512):
            x, r = (torch.randn(rows, hidden, device="cuda", dtype=torch.half) for _ in range(2))
            times = {}
            for warps in (1, 2, 4, 8, 16):
                if name == "layer_norm":
                    launch = lambda i: layer_norm_triton(x, w, b, 1e-5, r, num_warps=warps)   # noqa: E731
                else:
                    launch = lambda i: rms_norm_triton(x, w, 1e-5, r, num_warps=warps)       # noqa: E731
                times[warps] = time_in_graph(launch, 1) * 1e3
            row = {"norm": name, "hidden": hidden, "rows": rows, "default_warps": NORM_WARPS, "us": times,
                   "best": min(times, key=times.get)}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(), "commit": commit(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "rows": rows_out}
    path = os.path.join(args.out, f"{torch.cuda.get_device_name().replace(' ', '-')}-{result['date']}-norms.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
