"""The symmetric-memory one-shot all-reduce (kernels/allreduce.py) on two GPUs (`pytest -m gpu`; skipped
with fewer): fp32 and bf16 summed by torch's kernel, fp16 in fp32 between casts; each equals NCCL's sum
(fp16 within its rounding, since NCCL adds in fp16), and sums past MAX_BYTES are left to NCCL (None)."""
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels import allreduce

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]


def _rank(rank: int, store_path: str, results) -> None:
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")    # no NVLink multicast
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store_path}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        out = {}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            g = torch.Generator(device="cuda").manual_seed(rank)
            x = torch.randn(32, 2560, generator=g, device="cuda").to(dtype)
            got = allreduce.all_reduce(x)
            nccl = x.clone()
            dist.all_reduce(nccl)
            exact = x.float().clone()
            dist.all_reduce(exact)
            out[str(dtype)] = (got is not None and got.dtype == dtype and got.shape == x.shape,
                               (got.float() - exact).abs().max().item(), (nccl.float() - exact).abs().max().item())
        big = torch.zeros(allreduce.MAX_BYTES // 2 + 1, dtype=torch.float16, device="cuda")
        out["too big"] = allreduce.all_reduce(big) is None
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_one_shot_sums_equal_nccls(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    for rank in (0, 1):
        r = results[rank]
        assert r["too big"]
        for dtype, (ok, err, nccl_err) in ((k, v) for k, v in r.items() if k != "too big"):
            assert ok, dtype
            assert err <= max(nccl_err, 1e-6), (dtype, err, nccl_err)      # no worse than NCCL's rounding
