"""The `rayspeed` launcher: DeepSpeed's `deepspeed --num_gpus N script.py` on a Ray cluster.

One placement group of N bundles, one `RankActor` per bundle; each actor runs the user script as a
subprocess with torch.distributed's `env://` variables and streams its output back live. The first
rank to fail stops the others; the placement group is removed whatever happens."""
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group_table

from cluster.placement import PlacementError, in_bundle, rank_bundles, release, reserve

_TERM_GRACE_S = 3.0  # SIGTERM, then SIGKILL: a rank blocked on a dead peer must not outlive the run
_STOP_WAIT_S = 10.0

@dataclass(frozen=True)
class LaunchSpec:
    """What to run (the user's script and arguments) and how to place its ranks."""
    script: str
    script_args: tuple[str, ...] = ()
    num_ranks: int = 1
    num_nodes: int | None = None
    cpus_per_rank: float = 1.0
    strategy: str = "PACK"
    timeout_s: float = 60.0
    local_rank_arg: bool = True
    cwd: str = field(default_factory=os.getcwd)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass(frozen=True)
class RankPlace:
    """Where one rank runs: its bundle, its global rank, its rank among the ranks of its node."""
    bundle_index: int
    rank: int
    local_rank: int
    local_world_size: int


def _kill_with_parent() -> None:
    """Runs in the child before exec: die with the actor even if it is SIGKILLed (Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pump(stream, name: str, lines: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):
        lines.put((name, raw.decode("utf-8", errors="replace").rstrip("\n")))
    lines.put((name, None))


@ray.remote(max_concurrency=4)  # terminate() must run while run() is streaming
class RankActor:
    """Holds one bundle and runs one rank of the user's script in it."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._stopped = False
        self._lock = threading.Lock()

    def describe(self) -> dict:
        """This actor's node IP and the GPU ids Ray gave it."""
        return {"node_ip": ray.util.get_node_ip_address(), "gpu_ids": [str(i) for i in ray.get_gpu_ids()]}

    def free_port(self) -> int:
        """A TCP port free on this node right now (for MASTER_PORT)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def run(self, cmd: list[str], env: dict[str, str], cwd: str):
        """Streaming generator: batches of `(stream, line)`; the last batch is `[("exit", code)]`."""
        with self._lock:
            if self._stopped:
                yield [("exit", -signal.SIGTERM)]
                return
            self._proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_kill_with_parent)
        lines: queue.Queue = queue.Queue()
        for stream, name in ((self._proc.stdout, "stdout"), (self._proc.stderr, "stderr")):
            threading.Thread(target=_pump, args=(stream, name, lines), daemon=True).start()
        open_streams = 2
        while open_streams:
            batch = [lines.get()]
            while not lines.empty():
                batch.append(lines.get_nowait())
            open_streams -= sum(text is None for _, text in batch)
            if any(text is not None for _, text in batch):
                yield [(name, text) for name, text in batch if text is not None]
        yield [("exit", self._proc.wait())]

    def terminate(self) -> None:
        """SIGTERM the rank's process group, SIGKILL it after a grace period."""
        with self._lock:
            self._stopped = True
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(_TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def place_ranks(pg: PlacementGroup, spec: LaunchSpec) -> list[RankPlace]:
    """Ranks grouped by node (nodes in order of their first bundle), so a node's ranks are contiguous;
    checks that the bundles landed on exactly `num_nodes` nodes when that was asked for."""
    node_of = placement_group_table(pg)["bundles_to_node_id"]
    nodes = list(dict.fromkeys(node_of[i] for i in range(spec.num_ranks)))
    if spec.num_nodes is not None and len(nodes) != spec.num_nodes:
        raise PlacementError(f"asked for {spec.num_nodes} nodes, but the {spec.num_ranks} bundles landed on "
                             f"{len(nodes)} node(s): {nodes}")
    places = []
    for node in nodes:
        bundles = [i for i in range(spec.num_ranks) if node_of[i] == node]
        places += [RankPlace(i, len(places) + local, local, len(bundles)) for local, i in enumerate(bundles)]
    return places


def start_actors(pg: PlacementGroup, spec: LaunchSpec, places: list[RankPlace]) -> list:
    """One `RankActor` per rank, in rank order, each pinned to its bundle."""
    num_gpus = pg.bundle_specs[0].get("GPU", 0)
    return [RankActor.options(num_cpus=spec.cpus_per_rank, num_gpus=num_gpus,
                              scheduling_strategy=in_bundle(pg, place.bundle_index)).remote() for place in places]


def _command(spec: LaunchSpec, local_rank: int) -> list[str]:
    local_rank_arg = [f"--local_rank={local_rank}"] if spec.local_rank_arg else []  # where DeepSpeed puts it
    return [sys.executable, "-u", spec.script, *local_rank_arg, *spec.script_args]


def _rank_env(spec: LaunchSpec, place: RankPlace, master: dict, gpu_ids: list[str]) -> dict[str, str]:
    env = dict(spec.env, RANK=str(place.rank), LOCAL_RANK=str(place.local_rank), WORLD_SIZE=str(spec.num_ranks),
               LOCAL_WORLD_SIZE=str(place.local_world_size), MASTER_ADDR=master["addr"], MASTER_PORT=str(master["port"]))
    if gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
    return env


def start_ranks(spec: LaunchSpec, places: list[RankPlace], actors: list) -> list:
    """Starts every rank's script; returns one streaming generator per rank, in rank order."""
    described = ray.get([actor.describe.remote() for actor in actors])
    master = {"addr": described[0]["node_ip"], "port": ray.get(actors[0].free_port.remote())}
    return [actor.run.options(num_returns="streaming").remote(
                _command(spec, place.local_rank), _rank_env(spec, place, master, info["gpu_ids"]), spec.cwd)
            for actor, place, info in zip(actors, places, described)]


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal s: 128 + s, as a shell reports it


def stream(runs: list, actors: list) -> int:
    """Prints every rank's lines as `[rank N] line` as they come; returns 0 or the first failing
    rank's exit code, stopping the other ranks as soon as one fails."""
    pending = dict(zip(runs, range(len(runs))))
    failure, deadline = None, None
    while pending and (deadline is None or time.monotonic() < deadline):
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
        for run in ready:
            rank = pending[run]
            code = _relay(rank, run)
            if code is not None:
                del pending[run]
            if code and failure is None:
                failure, deadline = _exit_code(code), time.monotonic() + _STOP_WAIT_S
                print(f"rayspeed: rank {rank} exited with code {code}; stopping the other ranks",
                      file=sys.stderr, flush=True)
                for actor in actors:
                    actor.terminate.remote()
    return failure or 0


def _relay(rank: int, run) -> int | None:
    """Prints the next batch of one rank's lines; returns its exit code once it has ended."""
    try:
        batch = ray.get(next(run))
    except StopIteration:
        return 0
    except ray.exceptions.RayError as error:
        print(f"rayspeed: rank {rank} was lost: {error}", file=sys.stderr, flush=True)
        return 1
    for name, value in batch:
        if name == "exit":
            return value
        print(f"[rank {rank}] {value}", file=sys.stdout if name == "stdout" else sys.stderr, flush=True)
    return None


def stop(actors: list, pg: PlacementGroup | None) -> None:
    """Kills every rank (gracefully first) and gives the placement group back."""
    try:
        ray.wait([actor.terminate.remote() for actor in actors], num_returns=len(actors), timeout=_TERM_GRACE_S + 2)
    finally:
        for actor in actors:
            ray.kill(actor)
        release(pg)


def launch(spec: LaunchSpec) -> int:
    """Runs the script on `num_ranks` ranks of the connected Ray cluster; returns the exit code."""
    pg, actors = None, []
    try:
        pg = reserve(rank_bundles(spec.num_ranks, spec.cpus_per_rank), spec.strategy, spec.timeout_s)
        places = place_ranks(pg, spec)
        actors = start_actors(pg, spec, places)
        return stream(start_ranks(spec, places, actors), actors)
    except KeyboardInterrupt:
        print("rayspeed: interrupted; stopping all ranks", file=sys.stderr, flush=True)
        return 130
    finally:
        stop(actors, pg)
