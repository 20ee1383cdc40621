"""How fast a rank reads its shard of a safetensors checkpoint on local disk: every 2-D tensor of a
GPT-Neo-shaped checkpoint (hidden 2560, 4 layers, random fp16 weights, 0.9 GB) narrowed to half
along dim 0 (column-parallel shards: whole rows) and along dim 1 (row-parallel shards: a piece of
every row), then every tensor whole; MB/s of what was read, the file in the page cache (written
just before). CPU only.

    python3 bench/checkpoint_read.py --out bench/results
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.tensor_files import TensorFiles  # noqa: E402
from bench.decode import commit  # noqa: E402


def write(path: str) -> None:
    import transformers as tf
    config = tf.GPTNeoConfig(hidden_size=2560, num_layers=4, num_heads=20, vocab_size=50257,
                             max_position_embeddings=2048, window_size=256, attention_types=[[["global", "local"], 2]])
    torch.manual_seed(0)
    tf.GPTNeoForCausalLM(config).half().save_pretrained(path)


def rate(tensors: dict, view) -> dict:
    start, nbytes = time.perf_counter(), 0
    for t in tensors.values():
        part = view(t)
        if part is not None:
            nbytes += part.materialize().nbytes
    seconds = time.perf_counter() - start
    return {"mb": round(nbytes / 1e6, 1), "s": round(seconds, 3), "mb_per_s": round(nbytes / 1e6 / seconds)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/rayspeed-neo-read-bench")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.ckpt, "model.safetensors")):
        write(args.ckpt)
    tensors = TensorFiles(None).tensors(os.path.join(args.ckpt, "model.safetensors"))
    half = lambda dim: lambda t: t.narrow(dim, t.shape[dim] // 2, t.shape[dim] // 2) if t.dim() == 2 else None  # noqa: E731
    result = {"bench": "checkpoint-read", "commit": commit(), "date": datetime.date.today().isoformat(),
              "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
              "half_dim0": rate(tensors, half(0)), "half_dim1": rate(tensors, half(1)), "whole": rate(tensors, lambda t: t)}
    print(json.dumps(result))
    path = os.path.join(args.out, f"cpu-{result['date']}-checkpoint-read{args.tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
