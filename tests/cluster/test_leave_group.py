"""Leaving a TP group: `actors.cuda_graphs.destroy_process_group` resets the graphs `record` captured
before destroying the group, since a live graph holding NCCL collectives makes torch's destroy hang
(a TP=2 rank on 2 x H200 never exited). On CPU a gloo world of two processes checks the group goes
away and a second call is harmless; on a GPU (`pytest -m gpu`) graphs that captured all-reduces over
NCCL are reset and the ranks exit within the join's time limit."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.cuda_graphs import _live, destroy_process_group, record, release_graphs


def _gloo_rank(rank: int, store_path: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    destroy_process_group()
    gone = not dist.is_initialized()
    destroy_process_group()                              # nothing left: a no-op, not an error
    results[rank] = (total.item(), gone, release_graphs())


def test_leaving_a_gloo_group_destroys_it_once(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_gloo_rank, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    assert dict(results) == {0: (3.0, True, 0), 1: (3.0, True, 0)}


def _nccl_rank(rank: int, world: int, store_path: str, results) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    x = torch.full((1024,), float(rank + 1), device="cuda")

    def step(t):
        dist.all_reduce(t)
        return t + 1

    graphs = [record(step, (x,), None, warmups=1) for _ in range(2)]
    for graph, _ in graphs:
        graph.replay()
    live = len(_live)
    destroy_process_group()                              # the graphs still referenced here: reset inside
    results[rank] = (live, len(_live), dist.is_initialized(), x[0].item())
    del graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ranks_whose_graphs_captured_nccl_collectives_exit(tmp_path):
    world = min(torch.cuda.device_count(), 2)
    results = mp.Manager().dict()
    ctx = mp.spawn(_nccl_rank, args=(world, str(tmp_path / "store"), results), nprocs=world, join=False)
    for process in ctx.processes:
        process.join(120)
    alive = [p.pid for p in ctx.processes if p.is_alive()]
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    assert not alive, f"ranks {alive} did not exit in 120 s (destroy_process_group hung)"
    assert all(p.exitcode == 0 for p in ctx.processes), [p.exitcode for p in ctx.processes]
    # x ran four all-reduces in place (two warm-ups, two replays; captures run nothing): the ranks'
    # values summed, then multiplied by the world size three times
    expected = world * (world + 1) / 2 * world ** 3
    assert dict(results) == {r: (2, 0, False, expected) for r in range(world)}
