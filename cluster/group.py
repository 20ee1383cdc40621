"""`InferenceGroup`: a plain Ray actor owning one tensor-parallel group.

It reserves the placement group, starts one `Worker` per bundle, runs the rendezvous and the
load, forwards requests to rank 0, watches the other ranks, and tears everything down. A rank
that fails while loading, or dies later, fails the group with an error naming the rank; requests
in flight end with that error instead of hanging.
"""
import asyncio
import time

import ray

from actors.outputs import RequestOutput, add_text
from actors.sequence import SamplingParams
from actors.sharded_checkpoint import open_any
from actors.worker import Worker
from cluster.config import ConfigError, InferenceConfig
from cluster.generation import encode_prompts, token_list
from cluster.placement import in_bundle, rank_bundles, release, reserve


class GroupError(RuntimeError):
    """The TP group failed (a rank died or could not load); it must be rebuilt."""


class InferenceGroupImpl:
    def __init__(self, config: InferenceConfig):
        if not isinstance(config.checkpoint, str):
            raise ConfigError("InferenceGroup needs config.checkpoint: a directory or fsspec URI of an HF model")
        self.config = config
        self.pg = None
        self.workers: list = []
        self.failure: str | None = None
        self.report: dict = {}
        self.tokenizer = None
        self._started: asyncio.Task | None = None

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> dict:
        """Reserve, spawn, rendezvous and load; idempotent. Returns the load report."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)
        return self.report

    async def _start(self) -> None:
        t0 = time.perf_counter()
        c = self.config
        self.pg = await asyncio.to_thread(reserve, rank_bundles(c.tp_size, c.worker_cpus), c.placement_strategy,
                                          c.placement_timeout_s)
        use_gpu = "GPU" in self.pg.bundle_specs[0]
        actor = ray.remote(Worker)
        self.workers = [actor.options(num_cpus=c.worker_cpus, num_gpus=1 if use_gpu else 0,
                                      scheduling_strategy=in_bundle(self.pg, rank)).remote(c, rank, c.tp_size)
                        for rank in range(c.tp_size)]
        try:
            host, port = await self.workers[0].address.remote()
            ranks = await self._gather_or_fail([w.setup.remote(host, port, c.checkpoint) for w in self.workers],
                                               "while loading")
        except BaseException:
            await self.shutdown()
            raise
        ckpt = open_any(c.checkpoint, c.storage_options, 0, c.tp_size)
        self.tokenizer, self.generation_config = ckpt.tokenizer(), ckpt.generation_config()
        self.hf_config = ckpt.hf_config()
        self.report = {"ranks": ranks, "start_s": time.perf_counter() - t0, "tp_size": c.tp_size}
        self._watch = [asyncio.ensure_future(self._watch_rank(r, w.follow.remote()))
                       for r, w in enumerate(self.workers) if r > 0]

    async def _gather_or_fail(self, refs: list, stage: str) -> list:
        pending = {asyncio.ensure_future(self._named(rank, ref)) for rank, ref in enumerate(refs)}
        results = {}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                rank, value, error = task.result()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise GroupError(f"rank {rank} failed {stage}: {error}") from None
                results[rank] = value
        return [results[r] for r in sorted(results)]

    @staticmethod
    async def _named(rank: int, ref):
        try:
            return rank, await ref, None
        except Exception as e:
            return rank, None, _cause(e)

    async def _watch_rank(self, rank: int, follow_ref) -> None:
        try:
            await follow_ref
            reason = f"rank {rank} left its step loop"
        except Exception as e:
            reason = f"rank {rank} died: {_cause(e)}"
        if self.failure is None and self.workers:
            self.failure = reason
            for w in self.workers:                  # rank 0 too: its in-flight calls fail at once
                ray.kill(w, no_restart=True)

    async def shutdown(self) -> None:
        """Stop every rank and release the placement group."""
        if self.workers:
            try:
                await asyncio.wait_for(self.workers[0].shutdown.remote(), 30)
            except Exception:
                pass
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        release(self.pg)
        self.pg = None

    # -- requests ----------------------------------------------------------------------------

    async def _rank0(self, method: str, *args):
        await self.start()
        if self.failure:
            raise GroupError(f"TP group failed: {self.failure}")
        try:
            return await getattr(self.workers[0], method).remote(*args)
        except ray.exceptions.RayActorError as e:
            await asyncio.sleep(0.5)                # let the watcher name the rank that died
            raise GroupError(f"TP group failed: {self.failure or _cause(e)}") from None
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None

    async def generate(self, prompts, **sampling) -> list[RequestOutput]:
        """Prompts as strings (with a checkpoint tokenizer) or token-id lists; sampling as SamplingParams."""
        await self.start()
        ids, texts = encode_prompts(prompts, self.tokenizer)
        sampling.setdefault("stop_token_ids", tuple(token_list(self.generation_config.eos_token_id)))
        results = await self._rank0("generate", ids, SamplingParams.build(**sampling))
        return add_text(results, self.tokenizer, texts)

    async def generate_ids(self, prompts: list[list[int]], params: SamplingParams,
                           position_offsets: list[int] | None = None) -> list[RequestOutput]:
        return await self._rank0("generate", prompts, params, position_offsets)

    async def forward_logits(self, prompts: list[list[int]], position_offsets: list[int]):
        return await self._rank0("forward_logits", prompts, position_offsets)

    async def health(self) -> dict:
        """Rank 0's engine loop state plus every rank's liveness; raises if the group failed."""
        await self.start()
        if self.failure:
            raise GroupError(f"TP group failed: {self.failure}")
        return await self._rank0("health")

    async def model_info(self) -> dict:
        await self.start()
        return {"hf_config": self.hf_config, "generation_config": self.generation_config,
                "tokenizer": self.tokenizer, "report": self.report}


def _cause(error: BaseException) -> str:
    cause = getattr(error, "cause", None)
    return repr(cause) if cause is not None else str(error).strip().splitlines()[-1][:500]


InferenceGroup = ray.remote(num_cpus=0)(InferenceGroupImpl)
