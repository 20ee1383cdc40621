"""The plan header's host-to-host path: beside an NCCL world every rank joins a gloo group of its own
(`host_group`), and `broadcast_host` sends a CPU tensor through it while the world group still
carries the rest. Run here with a gloo world in two processes (no GPU: the group is asked for as
for a CUDA device)."""
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels.linear import TensorParallel, host_group


def _rank(rank: int, store_path: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        assert host_group(torch.device("cpu"), timedelta(seconds=60)) is None     # the world is gloo already
        plans = host_group(torch.device("cuda"), timedelta(seconds=60))
        tp = TensorParallel(rank, 2, dist.group.WORLD, plans)
        header = tp.broadcast_host(torch.tensor([7, 1, 2, 3, 4, 5]) if rank == 0 else torch.zeros(6, dtype=torch.int64))
        payload = tp.broadcast(torch.arange(4.0) if rank == 0 else torch.zeros(4))
        total = tp.all_reduce(torch.tensor([float(rank + 1)]))
        results[rank] = (header.tolist(), payload.tolist(), total.item(), plans is not None and plans != dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_broadcast_host_goes_through_a_gloo_group_beside_the_world(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    expected = ([7, 1, 2, 3, 4, 5], [0.0, 1.0, 2.0, 3.0], 3.0, True)
    assert dict(results) == {0: expected, 1: expected}, dict(results)
