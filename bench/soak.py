"""Soak: N requests spread over T seconds against a running app (OpenAI completions, streaming and
not, at most C in flight), watching /healthz meanwhile. Reports completed / failed (with reasons),
latency p50/p90/p99, time to first token p50/p99 (streaming requests: the first SSE chunk) and
throughput, as JSON with the machine, commit and date, to stdout and to --out.

    python3 bench/soak.py --url http://127.0.0.1:8000 --requests 400 --duration 120 --concurrency 8
    python3 bench/soak.py --demo --requests 400 --duration 120 --out bench/results/soak-cpu-$(date +%F).json

--demo starts a local Ray + Serve with the CPU demo app (tiny random-weight GPT-Neo) on a free
loopback port first. A request counts as completed only with HTTP 200, a finish_reason and, when
streamed, an SSE stream ending in [DONE] without an error event.
"""
import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = ["DeepSpeed is", "Ray Serve scales", "The quick brown fox", "Once upon a time, in a cluster far away",
           "Tensor parallelism splits", "A", "Paged attention keeps the KV cache in blocks of tokens"]


TEMPERATURE = 0.7


def prompt(i: int) -> str:
    """Request i's prompt (every burst of the Serve benchmarks sends the same ones)."""
    return PROMPTS[i % len(PROMPTS)] + f" #{i}"


async def one(http: httpx.AsyncClient, i: int, stream: bool, max_tokens: int, seeded: bool = True) -> dict:
    """One completion (temperature 0.7, seed i unless not `seeded`); its outcome, latency, time to first
    token (streamed) and output tokens."""
    body = {"prompt": prompt(i), "max_tokens": max_tokens, "temperature": TEMPERATURE,
            "seed": i if seeded else None, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    start, ttft = time.perf_counter(), None
    try:
        if not stream:
            reply = await http.post("/v1/completions", json=body)
            if reply.status_code != 200:
                return _failure(start, f"{reply.status_code} {_error_type(reply.text)}")
            out = reply.json()
            ok = out["choices"][0]["finish_reason"] is not None
            return _result(start, None, out["usage"]["completion_tokens"], ok)
        async with http.stream("POST", "/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                return _failure(start, f"{reply.status_code} {_error_type((await reply.aread()).decode())}")
            events = []
            async for line in reply.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if ttft is None:                   # the server sends a chunk once there is text
                        ttft = time.perf_counter() - start
        return _stream_result(start, ttft, events)
    except httpx.HTTPError as e:
        return _failure(start, type(e).__name__)


def _stream_result(start: float, ttft: float | None, events: list[str]) -> dict:
    if not events or events[-1] != "[DONE]":
        return _failure(start, "stream ended without [DONE]")
    chunks = [json.loads(e) for e in events[:-1]]
    errors = [c["error"]["type"] for c in chunks if "error" in c]
    if errors:
        return _failure(start, f"error event {errors[0]}")
    usage = [c["usage"]["completion_tokens"] for c in chunks if c.get("usage")]
    finished = any(ch["finish_reason"] for c in chunks for ch in c["choices"])
    return _result(start, ttft, usage[-1] if usage else 0, finished)


def _result(start: float, ttft: float | None, tokens: int, finished: bool) -> dict:
    if not finished:
        return _failure(start, "no finish_reason")
    return {"ok": True, "latency_s": time.perf_counter() - start, "ttft_s": ttft, "tokens": tokens,
            "streamed": ttft is not None}


def _failure(start: float, reason: str) -> dict:
    return {"ok": False, "latency_s": time.perf_counter() - start, "reason": reason}


def _error_type(text: str) -> str:
    try:
        return json.loads(text)["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return text[:80]


async def watch_health(http: httpx.AsyncClient, stop: asyncio.Event, seen: dict) -> None:
    """Largest running / waiting / KV blocks in use seen on /healthz, and how often it was not 200."""
    while not stop.is_set():
        try:
            reply = await http.get("/healthz")
            if reply.status_code == 200:
                for key in ("running", "waiting", "kv_blocks_used"):
                    seen[f"max_{key}"] = max(seen.get(f"max_{key}", 0), reply.json()[key])
            else:
                seen["unhealthy_polls"] = seen.get("unhealthy_polls", 0) + 1
        except httpx.HTTPError:
            seen["unhealthy_polls"] = seen.get("unhealthy_polls", 0) + 1
        await asyncio.sleep(0.5)


async def run(url: str, requests: int, duration_s: float, concurrency: int, stream_fraction: float = 0.5,
              max_tokens: int = 32, api_key: str | None = None) -> dict:
    """Request i starts at i * duration_s / requests (or later, while `concurrency` are in flight)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate, stop, seen = asyncio.Semaphore(concurrency), asyncio.Event(), {}
    every = round(1 / stream_fraction) if stream_fraction > 0 else 0
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300,
                                 limits=httpx.Limits(max_connections=concurrency + 2)) as http:
        async def scheduled(i: int) -> dict:
            await asyncio.sleep(i * duration_s / requests)
            async with gate:
                return await one(http, i, every > 0 and i % every == 0, max_tokens)
        watcher = asyncio.ensure_future(watch_health(http, stop, seen))
        start = time.perf_counter()
        results = await asyncio.gather(*[scheduled(i) for i in range(requests)])
        wall = time.perf_counter() - start
        stop.set()
        await watcher
    return summary(results, wall, seen) | {"url": url, "requests": requests, "duration_target_s": duration_s,
                                           "concurrency": concurrency, "stream_fraction": stream_fraction,
                                           "max_tokens": max_tokens}


def percentiles(values: list[float], qs: tuple[int, ...]) -> dict:
    values = sorted(values)
    if not values:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": round(values[min(len(values) - 1, int(q / 100 * len(values)))], 4) for q in qs}


def summary(results: list[dict], wall_s: float, health: dict) -> dict:
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    return {"completed": len(ok), "failed": len(results) - len(ok),
            "failures": dict(Counter(r["reason"] for r in results if not r["ok"])),
            "wall_s": round(wall_s, 2), "requests_per_s": round(len(ok) / wall_s, 2), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / wall_s, 1),
            "latency_s": percentiles([r["latency_s"] for r in ok], (50, 90, 99)) | {
                "max": round(max((r["latency_s"] for r in ok), default=0), 4)},
            "ttft_s": percentiles([r["ttft_s"] for r in ok if r["ttft_s"] is not None], (50, 99)),
            "streamed": sum(r["streamed"] for r in ok), "health": health}


def provenance() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"machine": {"device": "cpu", "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "commit": commit.stdout.strip() or None, "date": datetime.date.today().isoformat()}


def start_demo(app_args: dict) -> str:
    """Local Ray + Serve on a free loopback port with the CPU demo app; returns its URL."""
    import socket

    import ray
    from ray import serve

    from serve_apps.gpt_neo import app

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app({"replica_cpus": 1, **app_args}), name="soak", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="the app's base URL (without /v1)")
    p.add_argument("--demo", action="store_true", help="start the CPU demo app locally and soak it")
    p.add_argument("--app-arg", action="append", default=[], help="k=v for the demo app (repeatable)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--duration", type=float, default=60.0, help="seconds over which requests start")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--stream-fraction", type=float, default=0.5)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--api-key", default=os.environ.get("RAYSPEED_API_KEY"))
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    if not (a.url or a.demo):
        p.error("give --url or --demo")
    url = a.url or start_demo(dict(kv.split("=", 1) for kv in a.app_arg))
    result = asyncio.run(run(url, a.requests, a.duration, a.concurrency, a.stream_fraction, a.max_tokens,
                             a.api_key)) | {"bench": "soak", "demo_app": a.demo} | provenance()
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
