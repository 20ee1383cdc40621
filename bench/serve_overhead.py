"""What the serving layers cost a generated token, on the CPU demo app (tiny GPT-Neo, random weights).

1. Detokenisation, per streamed token, at 256 / 1,024 / 4,096 output tokens: `TextStream` (a window
   from the last character boundary) against decoding the whole output at every push (what the
   stream did before d8743bb), with the demo tokenizer.
2. The same C concurrent requests of N tokens (greedy, ignore_eos), at three depths: the engine loop
   alone (token deltas), `LLMServer` in-process (text chunks as OpenAI stream events, no HTTP), and
   HTTP through Ray Serve (streaming SSE at each stream-batching setting, one app each, and unary),
   medians over rounds that take the settings in turn. Generated tok/s of each, and CPU time per
   generated token where it is spent: the engine thread (steps, and handing deltas to the event
   loop), the event loop's thread (the server: detokenisation, events), and over HTTP the replica
   process and Serve's proxy. On a GPU the engine makes tens of thousands of tokens a second: these
   per-token costs say what share of a core the layers around it would need then.

    python3 bench/serve_overhead.py --out bench/results      # writes cpu-<date>-serve-overhead.json
"""
import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time

import httpx
import torch
from ray import serve

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.soak import provenance, start_demo  # noqa: E402
from serve_apps.args import AppArgs  # noqa: E402
from serve_apps.gpt_neo import app as gpt_neo_app  # noqa: E402


def whole_decode_stream(tokenizer, ids: list[int]) -> str:
    """The old way: the whole output decoded at every push, the new text cut from its end."""
    out, emitted, seen = [], 0, []
    for token in ids:
        seen.append(token)
        text = tokenizer.decode(seen, skip_special_tokens=True)
        safe = len(text)
        while safe > emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        out.append(text[emitted:safe])
        emitted = max(emitted, safe)
    return "".join(out)


def detokenisation(lengths=(256, 1024, 4096)) -> list[dict]:
    from serve_apps.demo_model import byte_tokenizer
    from serve_apps.text_stream import TextStream, window_decoder
    tok = byte_tokenizer()
    source = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "performance.md")).read()
    ids = tok(source * 2)["input_ids"]
    rows = []
    for n in lengths:
        part = ids[:n]
        expected = tok.decode(part)
        t = time.perf_counter()
        assert whole_decode_stream(tok, part) == expected
        whole = (time.perf_counter() - t) / n
        stream = TextStream(window_decoder(tok), [])
        t = time.perf_counter()
        text = "".join(stream.push([i], final=False) for i in part) + stream.push([], final=True)
        window = (time.perf_counter() - t) / n
        assert text == expected
        rows.append({"tokens": n, "whole_decode_us_per_token": round(whole * 1e6, 2),
                     "window_us_per_token": round(window * 1e6, 2), "speedup": round(whole / window, 1)})
        print(rows[-1], flush=True)
    return rows


def prompts(concurrency: int) -> list[str]:
    return [f"request {i}: DeepSpeed is" for i in range(concurrency)]


async def engine_alone(server, concurrency: int, max_tokens: int) -> dict:
    """Token deltas straight from the engine loop (no detokenisation, no HTTP)."""
    from actors.sequence import SamplingParams
    loop = server.engine.loop
    params = SamplingParams.build(max_new_tokens=max_tokens, ignore_eos=True)

    async def one(text: str) -> int:
        return sum([len(d.token_ids) async for d in loop.stream(server.encode(text)[0], params)])
    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*[one(p) for p in prompts(concurrency)]))
    return rate(tokens, time.perf_counter() - start)


async def server_alone(server, concurrency: int, max_tokens: int, setting: dict) -> dict:
    """`LLMServer.complete_stream`: text chunks as OpenAI events, each JSON-encoded as for SSE."""
    from serve_apps.protocol import CompletionRequest
    args = AppArgs.parse(setting)
    server.stream_interval_s = args.stream_interval_ms / 1e3
    server.stream_events_per_s = args.max_stream_events_per_s or None

    async def one(text: str) -> tuple[int, int]:
        req = CompletionRequest(prompt=text, max_tokens=max_tokens, temperature=0, ignore_eos=True, stream=True,
                                stream_options={"include_usage": True})
        events = [json.dumps(e) async for e in server.complete_stream(req)]
        return json.loads(events[-1])["usage"]["completion_tokens"], len(events)
    start = time.perf_counter()
    results = await asyncio.gather(*[one(p) for p in prompts(concurrency)])
    return rate(sum(t for t, _ in results), time.perf_counter() - start) | {"events": sum(e for _, e in results)}


async def over_http(url: str, concurrency: int, max_tokens: int, stream: bool) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency + 2)) as http:
        async def one(text: str) -> tuple[int, int]:
            body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": stream, "stream_options": {"include_usage": True} if stream else None}
            if not stream:
                reply = await http.post("/v1/completions", json=body)
                reply.raise_for_status()
                return reply.json()["usage"]["completion_tokens"], 1
            events = []
            async with http.stream("POST", "/v1/completions", json=body) as reply:
                reply.raise_for_status()
                async for line in reply.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(line[6:])
            return json.loads(events[-1])["usage"]["completion_tokens"], len(events)
        start = time.perf_counter()
        results = await asyncio.gather(*[one(p) for p in prompts(concurrency)])
        wall = time.perf_counter() - start
    return rate(sum(t for t, _ in results), wall) | {"events": sum(e for _, e in results)}


def rate(tokens: int, wall_s: float) -> dict:
    return {"tokens": tokens, "wall_s": round(wall_s, 3), "tok_per_s": round(tokens / wall_s, 1)}


def cpu_s(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process, or of one of its threads (Linux /proc)."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def with_cpu(run, threads: dict[str, int], pids: dict[str, int] | None = None) -> dict:
    """`await run()` (a rate dict) with the CPU microseconds per token each thread / process spent."""
    me = os.getpid()
    before = {k: cpu_s(me, t) for k, t in threads.items()} | {k: cpu_s(p) for k, p in (pids or {}).items()}
    result = await run()
    after = {k: cpu_s(me, t) for k, t in threads.items()} | {k: cpu_s(p) for k, p in (pids or {}).items()}
    return result | {f"{k}_cpu_us_per_token": round((after[k] - before[k]) / result["tokens"] * 1e6, 1)
                     for k in before}


def median_of(runs: list[dict]) -> dict:
    """Per key, the median over rounds (the rounds' tok/s kept too)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {"rounds_tok_per_s": [r["tok_per_s"] for r in runs]}


async def in_process(app_args: dict, loads: list[tuple[int, int]], rounds: int) -> list[dict]:
    """The engine loop and LLMServer of a TP group of one rank built in this process, as the app does:
    each round runs the engine alone and the server at each streaming setting, in turn."""
    from serve_apps.demo_model import MODEL_NAME, demo_checkpoint
    from serve_apps.server import start_server
    server = await start_server(AppArgs.parse(app_args), demo_checkpoint(), MODEL_NAME)
    group = server.engine
    try:
        rows = []
        threads = {"engine_thread": group.rank0.loop._thread.native_id, "event_loop": threading.get_native_id()}
        for concurrency, max_tokens in loads:
            await engine_alone(server, 4, 8)                         # warm-up
            runs: dict[str, list] = {}
            for _ in range(rounds):
                runs.setdefault("engine", []).append(
                    await with_cpu(lambda: engine_alone(server, concurrency, max_tokens), threads))
                for name, setting in STREAMING.items():
                    runs.setdefault(f"server_{name}", []).append(await with_cpu(
                        lambda: server_alone(server, concurrency, max_tokens, setting), threads))
            rows.append({"concurrency": concurrency, "max_tokens": max_tokens} |
                        {k: median_of(v) for k, v in runs.items()})
            print(rows[-1], flush=True)
        return rows
    finally:
        await group.shutdown()


def serve_pids(app_name: str) -> dict[str, int]:
    """An app's replica process (it hosts rank 0: the engine too) and Serve's HTTP proxy (found by its
    process title, as the state API needs the dashboard)."""
    replica = serve.get_app_handle(app_name).ranks.remote().result()[0]["pid"]
    proxies = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::ProxyActor"):
                    proxies.append(int(pid))
        except OSError:
            continue
    return {"replica_process": replica, "proxy_process": proxies[0]}


def over_serve(url: str, app_args: dict, rows: list[dict], rounds: int) -> None:
    """One app per streaming setting, side by side (its own replica, the node's one proxy); each round
    streams through each in turn, and sends the same requests unary to the first."""
    first, *others = STREAMING
    routes = {first: ("soak", url)}                  # start_demo's app: the first setting at /
    for name in others:
        serve.run(gpt_neo_app({"replica_cpus": 1, **app_args, **STREAMING[name]}), name=name, route_prefix=f"/{name}")
        routes[name] = (name, f"{url}/{name}")
    pids = {name: serve_pids(app) for name, (app, _) in routes.items()}
    for row in rows:
        c, n = row["concurrency"], row["max_tokens"]
        runs: dict[str, list] = {}
        for _ in range(rounds):
            for name, (_, base) in routes.items():
                runs.setdefault(f"http_stream_{name}", []).append(
                    asyncio.run(with_cpu(lambda: over_http(base, c, n, stream=True), {}, pids[name])))
            runs.setdefault("http_unary", []).append(
                asyncio.run(with_cpu(lambda: over_http(url, c, n, stream=False), {}, pids[first])))
        row |= {k: median_of(v) for k, v in runs.items()}


# stream batching: every token as it comes, the app's defaults (20 ms, 500 events/s), a tighter event budget
STREAMING = {"every": {"stream_interval_ms": 0, "max_stream_events_per_s": 0}, "default": {},
             "budget250": {"max_stream_events_per_s": 250}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", action="append", default=[], help="CONCURRENCY:TOKENS (repeatable; default 1:128, "
                                                              "64:128)")
    p.add_argument("--rounds", type=int, default=3, help="medians over this many rounds, settings interleaved")
    p.add_argument("--out", help="a directory: writes cpu-<date>-serve-overhead.json there")
    a = p.parse_args(argv)
    loads = [tuple(int(x) for x in s.split(":")) for s in a.load] or [(1, 128), (64, 128)]
    app_args = {"max_num_seqs": max(c for c, _ in loads), "kv_cache_blocks": 2048, "accelerator": "cpu"}
    result = {"bench": "serve_overhead", "app_args": app_args, "rounds": a.rounds, "detokenisation": detokenisation()}
    url = start_demo(app_args | STREAMING[next(iter(STREAMING))])    # Ray + Serve with the demo app
    torch.set_num_threads(1)                     # as in a replica of 1 CPU (Ray sets OMP_NUM_THREADS=1 there)
    rows = asyncio.run(in_process(app_args, loads, a.rounds))
    over_serve(url, app_args, rows, a.rounds)
    for row in rows:
        engine = row["engine"]["tok_per_s"]
        row["share_of_engine"] = {k: round(v["tok_per_s"] / engine, 3) for k, v in row.items()
                                  if isinstance(v, dict) and k != "engine"}
        print(row, flush=True)
    result |= {"loads": rows} | provenance()
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"cpu-{result['date']}-serve-overhead.json"), "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
