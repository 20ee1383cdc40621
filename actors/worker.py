"""`Worker`: one tensor-parallel rank as a Ray actor (one per placement-group bundle, one GPU each).

Start-up, in order: `address` (rank 0: host and a free port) -> `setup` (process group with a
timeout, model shard built and loaded from the checkpoint, KV cache sized across ranks) ->
rank 0 serves `generate` / `forward_logits` from its `EngineLoop`; ranks > 0 run `follow`
(lockstep with rank 0's plans) until shut down.
"""
import asyncio
import os
import resource
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from actors.build import load_engine
from actors.cuda_graphs import destroy_process_group
from actors.engine_loop import EngineLoop
from actors.model_runner import STOP
from actors.sequence import SamplingParams
from actors.sharded_checkpoint import open_any
from kernels.linear import TensorParallel, host_group


KEEPALIVE_MAX_S = 30.0      # an idle TP group's rank 0 sends its followers an empty plan at least this often


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rss_mb() -> float:
    """This process's resident memory now (MiB; Linux's /proc, else the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Worker:
    def __init__(self, config, rank: int, world_size: int):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.engine = None
        self.loop: EngineLoop | None = None

    def address(self) -> tuple[str, int]:
        import ray
        return ray.util.get_node_ip_address(), free_port()

    def device(self) -> torch.device:
        """Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU: it is cuda:0 here."""
        if self.config.device:
            return torch.device(self.config.device)
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
            return torch.device("cuda", 0)
        return torch.device("cpu")

    async def setup(self, master_addr: str, master_port: int, checkpoint: str) -> dict:
        return await asyncio.to_thread(self._setup, master_addr, master_port, checkpoint)

    def _setup(self, master_addr: str, master_port: int, checkpoint: str) -> dict:
        start, rss_before = time.perf_counter(), rss_mb()
        device = self.device()
        if self.world_size > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                    world_size=self.world_size,
                                    timeout=timedelta(seconds=self.config.rendezvous_timeout_s))
        tp = TensorParallel()
        if self.world_size > 1:
            tp = TensorParallel(self.rank, self.world_size, dist.group.WORLD,
                                host_group(device, timedelta(seconds=self.config.rendezvous_timeout_s)))
        ckpt = open_any(checkpoint, self.config.storage_options, self.rank, self.world_size)
        self.engine = load_engine(ckpt, self.config, tp, device)
        if self.rank == 0:
            # followers idle inside a collective that times out after rendezvous_timeout_s: keep them awake
            keepalive_s = min(KEEPALIVE_MAX_S, self.config.rendezvous_timeout_s / 4) if self.world_size > 1 else None
            self.loop = EngineLoop(self.engine, keepalive_s)
        return {"rank": self.rank, "device": str(device), "pid": os.getpid(), "bytes_read": ckpt.bytes_read,
                "load_s": time.perf_counter() - start, "kv_blocks": self.engine.block_manager.num_blocks,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb(), **self.engine.startup}

    async def follow(self) -> None:
        """Ranks > 0: run rank 0's steps until it says STOP."""
        await asyncio.to_thread(self._follow)

    def _follow(self) -> None:
        while True:
            result, _ = self.engine.follow_call()
            if result is None and self.engine.runner.last_command == STOP:
                return

    async def generate(self, prompts: list[list[int]], params: SamplingParams,
                       position_offsets: list[int] | None = None):
        return await self.loop.generate(prompts, params, position_offsets)

    async def forward_logits(self, prompts: list[list[int]], position_offsets: list[int]):
        logits = await self.loop.call(lambda engine: engine.forward_logits(prompts, position_offsets))
        return [t.cpu() for t in logits]

    def health(self) -> dict:
        if self.loop is not None:
            return self.loop.health()
        return {"alive": self.engine is not None}

    def shutdown(self) -> None:
        if self.loop is not None:
            self.loop.shutdown()
        if self.engine is not None:                     # its graphs hold collectives: reset below
            self.engine.runner.graphs = self.engine.runner.prefill_graphs = None
        destroy_process_group(failed=self.loop is not None and self.loop.error is not None)
