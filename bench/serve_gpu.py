"""The Serve app with one TP=2 replica (--tp) on a local Ray cluster: startup time, a completion and an
SSE stream, 64 concurrent requests (generated tok/s, TTFT p50/p99, streaming vs not), and a follower
rank killed (SIGKILL) while requests run: seconds until requests fail with 503 and until a replacement
replica serves again (not at TP=1). The seeded burst also goes through the deployment's Python handle
(no HTTP), and at TP=1 on GPU through an engine of the same configuration in a process of its own
(`engine_alone`): what HTTP, and what Serve and the replica, cost.

    python3 bench/serve_gpu.py --out bench/results            # 2 GPUs: GPT-Neo 2.7B shape, random fp16 weights
    python3 bench/serve_gpu.py --tp 1 --profile --out bench/results   # one GPU, py-spy on the replica
    python3 bench/serve_gpu.py --cpu --out bench/results      # CPU: the tiny demo model over gloo

With --profile (py-spy installed), py-spy samples the replica process (rank 0 and the engine thread):
the GIL's holder through the streamed burst (<out>/pyspy-replica-tp<N>-gil.txt) and every thread through
the timed unary burst (<out>/pyspy-replica-tp<N>.txt), as raw collapsed stacks.

On GPU the checkpoint (random weights, the demo byte-level tokenizer) is written to --ckpt first by a
child process, so this driver never holds GPU memory. Writes <out>/<device>x<N>-<date>-serve-tp<N>.json.
"""
import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from queue import Empty

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.decode import commit  # noqa: E402
from bench.output import write  # noqa: E402
from bench.soak import TEMPERATURE, one, prompt, summary  # noqa: E402

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def write_checkpoint(path: str) -> None:
    """GPT-Neo 2.7B's shape with random fp16 weights (built on the GPU, fast), the demo model's vocabulary
    (320 ids: the byte tokenizer's 259 and padding) and the demo tokenizer: most sampled ids have text, so
    a stream's chunks (sent once there is text) show when tokens come. With GPT-Neo's 50,257 ids nearly
    every sample was an id the byte tokenizer has no text for, and the first chunk came at the end
    (2026-11-27)."""
    import torch

    from bench.decode import build
    from serve_apps.demo_model import BOS, EOS, PAD, VOCAB, byte_tokenizer
    hf = build("neo", vocab_size=VOCAB)
    special = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}     # GPT-Neo's 50256 is past VOCAB
    hf.config.update(special)
    hf.generation_config.update(**special)
    hf.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    del hf
    torch.cuda.empty_cache()


def app_args(cpu: bool, ckpt: str, tp: int = 2) -> dict:
    common = {"tp_size": tp, "health_check_period_s": 1, "max_queued_requests": 1024}
    if cpu:
        return common | {"accelerator": "cpu", "replica_cpus": 0.5, "worker_cpus": 0.5, "kv_cache_blocks": 1024,
                         "block_size": 8, "max_num_seqs": 64, "step_timeout_s": 30}
    return common | {"model": ckpt, "accelerator": "gpu", "dtype": "float16", "max_num_seqs": 64,
                     "gpu_memory_utilization": 0.8, "step_timeout_s": 60}


def start(cpu: bool, ckpt: str, tp: int) -> tuple[str, object, float]:
    """Local Ray + Serve on a free loopback port, the app deployed; (url, handle, seconds to healthy)."""
    import ray
    from ray import serve

    from serve_apps.gpt_neo import app
    env = NO_MULTICAST | ({"TRITON_INTERPRET": "1"} if cpu else {})
    os.environ.update(env)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=4 if cpu else 8, num_gpus=0 if cpu else tp, include_dashboard=False, configure_logging=False,
             log_to_driver=False, runtime_env={"env_vars": env})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    t = time.perf_counter()
    serve.run(app(app_args(cpu, ckpt, tp)), name="tp", route_prefix="/")
    wait_healthy(url, 300)
    return url, serve.get_app_handle("tp"), time.perf_counter() - t


def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no healthy replica within {timeout}s")


def smoke(url: str) -> dict:
    """/healthz, one completion, one SSE stream."""
    body = {"prompt": "DeepSpeed is", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    health = httpx.get(url + "/healthz", timeout=10)
    unary = httpx.post(url + "/v1/completions", json=body, timeout=60)
    events = []
    with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=60) as reply:
        stream_status = reply.status_code
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    streamed = "".join(c["text"] for e in events[:-1] for c in json.loads(e).get("choices", []))
    return {"healthz": health.status_code, "completion": unary.status_code,
            "completion_tokens": unary.json()["usage"]["completion_tokens"], "stream": stream_status,
            "stream_events": len(events), "stream_ends_done": events[-1:] == ["[DONE]"],
            "stream_equals_unary": streamed == unary.json()["choices"][0]["text"]}


ROUNDS = 3          # timed bursts per measurement: one burst of ~1 s read 6,500-9,600 tok/s on one code


def median_round(rounds: list[dict]) -> dict:
    """The round of median throughput, with every round's tok/s beside it."""
    ranked = sorted(rounds, key=lambda r: r["output_tokens_per_s"])
    return ranked[len(ranked) // 2] | {"rounds_tok_s": [r["output_tokens_per_s"] for r in rounds]}


def timed_rounds(burst, n: int, max_tokens: int) -> dict:
    """ROUNDS timed calls of `burst()` (n requests of up to max_tokens; returns the tokens generated): the
    median round's figures."""
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        generated = burst()
        seconds = time.perf_counter() - start
        rounds.append({"requests": n, "max_tokens": max_tokens, "output_tokens": generated, "wall_s": seconds,
                       "output_tokens_per_s": generated / seconds})
    return median_round(rounds)


async def client_rounds(url: str, ids: list[int], stream: bool, max_tokens: int, seeded: bool,
                        barrier=None) -> list[tuple[list[dict], float, float]]:
    """Requests `ids` at once, all streamed or all not, after a warm-up burst of them with 4 tokens (the
    batch sizes the timed burst passes through run once before it); ROUNDS times, each after `barrier`
    (other client processes) when given. Per round: the results, when it started and when it ended
    (time.perf_counter: one clock for every process of the machine)."""
    async with httpx.AsyncClient(base_url=url, timeout=300,
                                 limits=httpx.Limits(max_connections=len(ids) + 2)) as http:
        await asyncio.gather(*[one(http, i, stream, 4, seeded) for i in ids])
        rounds = []
        for _ in range(ROUNDS):
            if barrier is not None:
                await asyncio.to_thread(barrier.wait)
            start = time.perf_counter()
            results = await asyncio.gather(*[one(http, i, stream, max_tokens, seeded) for i in ids])
            rounds.append((results, start, time.perf_counter()))
        return rounds


def client_process(url: str, ids: list[int], stream: bool, max_tokens: int, seeded: bool, barrier, out) -> None:
    out.put(asyncio.run(client_rounds(url, ids, stream, max_tokens, seeded, barrier)))


def concurrent(url: str, n: int, stream: bool, max_tokens: int, seeded: bool = True, clients: int = 1) -> dict:
    """n requests at once from `clients` client processes (1: this one), ROUNDS bursts; the median
    burst's figures. One process's httpx client may itself limit a burst: more spread the client's
    work over cores, its requests still sent together."""
    if clients == 1:
        rounds = asyncio.run(client_rounds(url, list(range(n)), stream, max_tokens, seeded))
    else:
        barrier = multiprocessing.get_context("spawn").Barrier(clients)
        shares = in_children(client_process, [(url, list(range(c, n, clients)), stream, max_tokens, seeded, barrier)
                                              for c in range(clients)])
        rounds = [([r for share in shares for r in share[k][0]], min(share[k][1] for share in shares),
                   max(share[k][2] for share in shares)) for k in range(ROUNDS)]
    return median_round([summary(results, end - start, {}) for results, start, end in rounds])


def handle_burst(handle, n: int, max_tokens: int) -> dict:
    """The seeded burst through the deployment's Python handle (`handle.generate.remote`): Serve's router
    and the replica without HTTP, the proxy or the client's JSON; after a warm-up burst of 4 tokens."""
    def burst(tokens: int) -> int:
        calls = [handle.generate.remote(prompt(i), max_new_tokens=tokens, do_sample=True, temperature=TEMPERATURE,
                                        seed=i) for i in range(n)]
        return sum(len(call.result(timeout_s=300)["token_ids"]) for call in calls)
    burst(4)
    return timed_rounds(lambda: burst(max_tokens), n, max_tokens)


def spy(pid: int | None, out: str, *flags: str):
    """py-spy recording `pid` for 4 s at 250 Hz into `out` (raw collapsed stacks, one line per thread and
    stack), started 1 s before the caller's burst; None without a pid."""
    if pid is None:
        return None
    recorder = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "250", "--duration", "4",
                                 "--format", "raw", "--threads", "--nonblocking", *flags, "--output", out],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)                                       # let it attach
    return recorder


def spied(recorder) -> None:
    if recorder is not None:
        print("py-spy:", recorder.communicate(timeout=60)[0][-1500:], flush=True)


def load(url: str, n: int, max_tokens: int, profile_pid: int | None = None, profile_out: str = "",
         clients: int = 1) -> dict:
    """Seeded requests (as OpenAI clients often send) streamed and not, then unseeded ones not streamed.
    With `profile_pid`, py-spy samples that process: only the thread holding the GIL through the streamed
    burst (`<profile_out>-gil.txt`: which thread the interpreter serves, and whether it is ever free), and
    every thread, idle or not, through the unary burst (`<profile_out>.txt`)."""
    root = profile_out.removesuffix(".txt")
    recorder = spy(profile_pid, root + "-gil.txt", "--gil")
    streamed = concurrent(url, n, True, max_tokens, clients=clients)
    spied(recorder)
    recorder = spy(profile_pid, root + ".txt", "--idle")
    unary = concurrent(url, n, False, max_tokens, clients=clients)
    spied(recorder)
    unseeded = concurrent(url, n, False, max_tokens, seeded=False, clients=clients)
    return {"requests": n, "max_tokens": max_tokens, "clients": clients, "streaming": streamed, "non_streaming": unary,
            "non_streaming_unseeded": unseeded,
            "streaming_over_non_streaming_wall": streamed["wall_s"] / unary["wall_s"],
            "streaming_over_non_streaming_p50_latency": streamed["latency_s"]["p50"] / unary["latency_s"]["p50"]}


def engine_alone(ckpt: str, n: int, max_tokens: int, out) -> None:
    """The seeded burst's requests (same prompts, seeds, temperature and stop tokens) through an engine
    of the app's configuration in this process: no Serve, no HTTP, no event loop. What the replica's
    engine delivers alone, for the bursts to be read against; its tok/s goes into `out` (a queue)."""
    import torch

    from actors.build import load_engine
    from actors.sequence import SamplingParams
    from actors.sharded_checkpoint import open_any
    from cluster.generation import token_list
    from serve_apps.args import AppArgs
    config = AppArgs(**app_args(False, ckpt, 1)).inference_config(ckpt, True)
    opened = open_any(ckpt, None, 0, 1)
    engine = load_engine(opened, config, device=torch.device("cuda", 0))
    tokenizer, eos = opened.tokenizer(), tuple(token_list(opened.generation_config().eos_token_id))
    prompts = [tokenizer(prompt(i))["input_ids"] for i in range(n)]

    def burst(tokens: int) -> int:
        params = [SamplingParams.build(max_new_tokens=tokens, do_sample=True, temperature=TEMPERATURE, seed=i,
                                       stop_token_ids=eos) for i in range(n)]
        return sum(len(o.outputs[0].token_ids) for o in engine.generate(prompts, params))
    burst(4)                                              # as the HTTP bursts' warm-up
    out.put(timed_rounds(lambda: burst(max_tokens), n, max_tokens))


def in_children(target, arg_lists: list[tuple]) -> list:
    """`target(*args, queue)` for each args in a spawned process of its own, at once; what each put (in
    the order they put it). A child that exits without putting ends the wait with an error, not a hang."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    children = [ctx.Process(target=target, args=(*args, queue)) for args in arg_lists]
    for child in children:
        child.start()
    results = []
    while len(results) < len(children):
        try:
            results.append(queue.get(timeout=5))
        except Empty:
            if sum(not c.is_alive() for c in children) > len(results) and queue.empty():
                codes = [c.exitcode for c in children]
                raise RuntimeError(f"{target.__name__}: a child exited without a result (exit codes {codes})")
    for child in children:
        child.join()
    return results


def in_child(target, *args) -> dict:
    """`target(*args, queue)` in a spawned process (this driver keeps no GPU memory); what it put."""
    return in_children(target, [args])[0]


def follower_pid(handle) -> int:
    (rank1,) = [r for r in handle.ranks.remote().result(timeout_s=30) if r["rank"] == 1]
    return rank1["pid"]


async def probe_until_recovered(url: str, killed_at: float, timeout: float) -> dict:
    """Small completions every 0.2 s after the kill: when the first failure (503, or a timeout) came and
    when 200 came back after it."""
    body = {"prompt": "ok", "max_tokens": 4, "ignore_eos": True}
    seen, first_failure, first_503, recovered, codes = [], None, None, None, {}
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while time.perf_counter() - killed_at < timeout and recovered is None:
            try:
                code = (await http.post("/v1/completions", json=body)).status_code
            except httpx.HTTPError as e:
                code = type(e).__name__
            now = time.perf_counter() - killed_at
            codes[str(code)] = codes.get(str(code), 0) + 1
            if not seen or seen[-1][1] != code:
                seen.append((round(now, 3), code))
            first_503 = now if code == 503 and first_503 is None else first_503
            first_failure = now if code != 200 and first_failure is None else first_failure
            recovered = now if code == 200 and first_failure is not None else None
            await asyncio.sleep(0.2)
    return {"first_failure_s": first_failure, "first_503_s": first_503, "serving_again_s": recovered,
            "probe_codes": codes, "transitions": seen}


async def kill_and_probe(url: str, pid: int, max_tokens: int, timeout: float) -> dict:
    """8 long requests (half streamed) running, then SIGKILL to `pid`; how they ended and the probe's times."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        inflight = [asyncio.ensure_future(one(http, i, i % 2 == 0, max_tokens)) for i in range(8)]
        await asyncio.sleep(1.0)                            # let them start generating
        os.kill(pid, signal.SIGKILL)                        # the rank-1 Worker actor's process
        probe = await probe_until_recovered(url, time.perf_counter(), timeout)
        ended = await asyncio.gather(*inflight)
    return probe | {"inflight": [r.get("reason", "ok") for r in ended]}


def failover(url: str, handle, max_tokens: int, timeout: float) -> dict:
    old = follower_pid(handle)
    result = asyncio.run(kill_and_probe(url, old, max_tokens, timeout))
    new = follower_pid(handle) if result["serving_again_s"] is not None else None
    return result | {"old_follower_pid": old, "new_follower_pid": new}


def device_name(cpu: bool) -> str:
    if cpu:
        return "cpu"
    import torch
    return torch.cuda.get_device_name(0).replace(" ", "-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny demo model on CPU (gloo) instead of GPUs")
    ap.add_argument("--ckpt", default="/tmp/rayspeed-gpt-neo-2.7b-random")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=None, help="default 128 on GPU, 16 on CPU")
    ap.add_argument("--recovery-timeout", type=float, default=240)
    ap.add_argument("--tp", type=int, default=2, help="the replica's TP size (1: one GPU, no failover step)")
    ap.add_argument("--profile", action="store_true", help="py-spy on the replica during the unary burst")
    ap.add_argument("--clients", type=int, default=1, help="HTTP client processes sharing each burst")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    max_tokens = a.max_tokens or (16 if a.cpu else 128)
    result = {"bench": f"serve-tp{a.tp}", "cpu": a.cpu, "app_args": app_args(a.cpu, a.ckpt, a.tp), "commit": commit(),
              "date": datetime.date.today().isoformat(),
              "machine": {"cores": os.cpu_count(), "python": platform.python_version()}}
    if not a.cpu and not os.path.exists(os.path.join(a.ckpt, "config.json")):
        t = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(target=write_checkpoint, args=(a.ckpt,))
        child.start()
        child.join()
        assert child.exitcode == 0, f"writing the checkpoint failed ({child.exitcode})"
        result["checkpoint_write_s"] = time.perf_counter() - t
    url, handle, result["startup_s"] = start(a.cpu, a.ckpt, a.tp)
    result["ranks"] = handle.ranks.remote().result(timeout_s=30)
    os.makedirs(a.out, exist_ok=True)
    replica = next(r["pid"] for r in result["ranks"] if r["rank"] == 0) if a.profile else None
    steps = [("smoke", lambda: smoke(url)),
             ("load", lambda: load(url, a.requests, max_tokens, replica,
                                   os.path.join(a.out, f"pyspy-replica-tp{a.tp}.txt"), a.clients)),
             ("handle", lambda: handle_burst(handle, a.requests, max_tokens))]
    if a.tp > 1:
        steps.append(("failover", lambda: failover(url, handle, 4 * max_tokens, a.recovery_timeout)))
    for step, run in steps:
        t = time.perf_counter()
        result[step] = run()
        print(step, f"{time.perf_counter() - t:.1f}s", json.dumps(result[step])[:1500], flush=True)
    from ray import serve
    serve.shutdown()
    import ray
    ray.shutdown()
    if not a.cpu and a.tp == 1:
        t = time.perf_counter()
        try:
            result["engine_alone"] = in_child(engine_alone, a.ckpt, a.requests, max_tokens)
        except Exception as e:                            # the Serve figures above still get written
            result["engine_alone"] = {"error": repr(e)}
        print("engine_alone", f"{time.perf_counter() - t:.1f}s", json.dumps(result["engine_alone"]), flush=True)
    result["device"] = result["machine"]["device"] = device_name(a.cpu)
    write(result, a.out, f"serve-tp{a.tp}", device=f"{result['device']}x{a.tp}")


if __name__ == "__main__":
    main()
