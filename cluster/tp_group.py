"""`TPGroup`: rank 0 of a tensor-parallel group, hosted in the calling process (an `InferenceGroup`
actor or a Serve replica) that lives in bundle 0 of the placement group `pg`. It starts one
`Worker` actor per other bundle, runs the rendezvous and the load on every rank, serves requests
from rank 0's `EngineLoop`, and watches the other ranks: one that fails while loading fails the
start; one that dies later fails the requests in flight with an error naming it, never a hang; one
that stalls is caught by rank 0's step watchdog (`step_timeout_s`)."""
import asyncio
import time

import ray

from actors.engine_loop import EngineError
from actors.worker import Worker
from cluster.placement import in_bundle


class GroupError(EngineError):
    """The TP group failed (a rank died or could not load); it must be rebuilt."""


class TPGroup:
    def __init__(self, config, pg, step_timeout_s: float | None = None):
        self.config, self.pg = config, pg
        self.step_timeout_s = step_timeout_s
        self.rank0 = Worker(config, 0, config.tp_size)
        self.followers: list = []
        self.failure: str | None = None
        self.report: dict = {}
        self._watchers: list[asyncio.Task] = []

    async def start(self, checkpoint: str) -> dict:
        t0 = time.perf_counter()
        c = self.config
        use_gpu = "GPU" in self.pg.bundle_specs[0] if self.pg else False
        actor = ray.remote(Worker)
        self.followers = [actor.options(num_cpus=c.worker_cpus, num_gpus=1 if use_gpu else 0,
                                        scheduling_strategy=in_bundle(self.pg, rank)).remote(c, rank, c.tp_size)
                          for rank in range(1, c.tp_size)]
        host, port = self.rank0.address()
        setups = [self.rank0.setup(host, port, checkpoint)] + [w.setup.remote(host, port, checkpoint)
                                                               for w in self.followers]
        try:
            ranks = await _all_or_first_error(setups, "while loading")
        except BaseException:
            await self.shutdown()
            raise
        self.report = {"ranks": ranks, "start_s": time.perf_counter() - t0, "tp_size": c.tp_size}
        self.rank0.loop.watch_steps(self.step_timeout_s)
        self.rank0.loop.explain = self._explain
        self._watchers = [asyncio.ensure_future(self._watch(rank, w.follow.remote()))
                          for rank, w in enumerate(self.followers, start=1)]
        return self.report

    @property
    def loop(self):
        if self.failure:
            raise GroupError(f"TP group failed: {self.failure}")
        return self.rank0.loop

    def _explain(self, error: BaseException) -> GroupError:
        """A step that raised (e.g. gloo's "connection reset") usually means a rank died: give the
        watcher a moment to name it, so requests fail with the cause rather than the symptom."""
        deadline = time.monotonic() + 5
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.1)
        cause_ = self.failure or f"a step failed: {error!r}"
        return GroupError(f"TP group failed: {cause_}")

    async def _watch(self, rank: int, follow_ref) -> None:
        try:
            await follow_ref
            reason = f"rank {rank} left its step loop"
        except Exception as e:
            reason = f"rank {rank} died: {cause(e)}"
        if self.failure is None and self.followers:
            self.failure = reason
            self.rank0.loop.fail(GroupError(f"TP group failed: {reason}"))

    def health(self) -> dict:
        """Rank 0's engine loop state; raises `GroupError` once the group has failed."""
        health = self.loop.health()
        if not health["alive"]:
            raise GroupError(f"TP group unhealthy: {health['error']}")
        return health

    async def shutdown(self) -> None:
        for task in self._watchers:
            task.cancel()
        loop = self.rank0.loop
        if self.failure or (loop is not None and loop.error is not None):
            self._kill_followers()                      # first: rank 0 may sit in a collective with a stalled rank
        self.rank0.shutdown()
        self._kill_followers()

    def _kill_followers(self) -> None:
        for w in self.followers:
            ray.kill(w, no_restart=True)
        self.followers = []


async def _all_or_first_error(calls: list, stage: str) -> list:
    """Await every rank's call; on the first failure, raise `GroupError` naming the rank."""
    async def named(rank, call):
        try:
            return rank, await call, None
        except Exception as e:
            return rank, None, cause(e)
    pending = {asyncio.ensure_future(named(rank, call)) for rank, call in enumerate(calls)}
    results = {}
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            rank, value, error = task.result()
            if error is not None:
                for other in pending:
                    other.cancel()
                raise GroupError(f"rank {rank} failed {stage}: {error}") from None
            results[rank] = value
    return [results[r] for r in sorted(results)]


def cause(error: BaseException) -> str:
    """The message of the error behind a Ray error, in one line."""
    inner = getattr(error, "cause", None)
    if inner is not None:
        return f"{type(inner).__name__}: {inner}"
    return str(error).strip().splitlines()[-1][:500] if str(error).strip() else type(error).__name__
