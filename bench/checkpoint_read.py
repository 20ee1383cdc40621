"""How fast a rank reads its shard of a safetensors checkpoint on local disk: every 2-D tensor of a
GPT-Neo-shaped checkpoint (hidden 2560, 4 layers, random fp16 weights, 0.9 GB) narrowed to half
along dim 0 (column-parallel shards: whole rows) and along dim 1 (row-parallel shards: a piece of
every row), then every tensor whole; MB/s of what was read, the file in the page cache (written
just before). CPU only.

With --s3 layer 0's row-parallel weights go to a local moto S3 server and are read through s3fs:
their shards (attention output and MLP down, half of each row: 5,120 runs) once run by run (one GET
a row, REMOTE_EXACT_RUNS raised past them) and once in spanning blocks (the default), with the GET
requests and bytes each took. moto is not S3 (here it served about 20 of these GETs a second): the
request counts carry over to a real store, the seconds do not.

    python3 bench/checkpoint_read.py --out bench/results
    python3 bench/checkpoint_read.py --s3 --out bench/results
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

import safetensors.torch
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.tensor_files import TensorFiles  # noqa: E402
from bench.decode import commit  # noqa: E402
from bench.output import write  # noqa: E402


def write_checkpoint(path: str) -> None:
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


def half(dim: int):
    return lambda t: t.narrow(dim, t.shape[dim] // 2, t.shape[dim] // 2) if t.dim() == 2 else None


ROW_PARALLEL = ("transformer.h.0.attn.attention.out_proj.weight", "transformer.h.0.mlp.c_proj.weight")


def s3_reads(ckpt: str) -> dict:
    """Layer 0's row-parallel weights, uploaded alone (one 65 MB PUT: moto took minutes over the whole
    file), their halves read from a moto S3 server run by run and in spanning blocks."""
    import boto3
    from moto.server import ThreadedMotoServer

    from actors import lazy_tensor
    default = lazy_tensor.REMOTE_EXACT_RUNS
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        client = {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}
        s3 = boto3.client("s3", aws_access_key_id="bench", aws_secret_access_key="bench", **client)
        s3.create_bucket(Bucket="ckpt")
        local = TensorFiles(None).tensors(os.path.join(ckpt, "model.safetensors"))
        layer0 = {n: t.materialize() for n, t in local.items() if n in ROW_PARALLEL}
        s3.put_object(Bucket="ckpt", Key="neo/model.safetensors", Body=safetensors.torch.save(layer0))
        options = {"key": "bench", "secret": "bench", "skip_instance_cache": True, "client_kwargs": client}
        out = {}
        for name, exact_runs in (("run_by_run", 1 << 30), ("spanning_blocks", default)):
            lazy_tensor.REMOTE_EXACT_RUNS = exact_runs
            files = TensorFiles(options)
            tensors = files.tensors("s3://ckpt/neo/model.safetensors")
            reader = next(iter(tensors.values())).reader
            before, requests = files.bytes_read, reader.requests
            out[name] = rate(tensors, half(1)) | {"runs": sum(t.shape[0] for t in tensors.values()),
                                                   "bytes_fetched": files.bytes_read - before,
                                                   "requests": reader.requests - requests}
        return out
    finally:
        lazy_tensor.REMOTE_EXACT_RUNS = default
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/rayspeed-neo-read-bench")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--s3", action="store_true", help="row-parallel halves from a local moto S3 server instead")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.ckpt, "model.safetensors")):
        write_checkpoint(args.ckpt)
    result = {"bench": "checkpoint-read" + ("-s3" if args.s3 else ""), "commit": commit(),
              "date": datetime.date.today().isoformat(),
              "machine": {"cores": os.cpu_count(), "python": platform.python_version()}}
    if args.s3:
        result |= s3_reads(args.ckpt)
    else:
        tensors = TensorFiles(None).tensors(os.path.join(args.ckpt, "model.safetensors"))
        result |= {"half_dim0": rate(tensors, half(0)), "half_dim1": rate(tensors, half(1)),
                   "whole": rate(tensors, lambda t: t)}
    print(json.dumps(result))
    write(result, args.out, result["bench"] + args.tag, indent=1)


if __name__ == "__main__":
    main()
