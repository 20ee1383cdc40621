"""Overload: twenty times more concurrent requests than the KV cache holds all complete, in order of
arrival, with the outputs of one-by-one runs; with a small queue limit the surplus gets a clear 503
with Retry-After and the queue never grows past the limit."""
import asyncio
import threading
import time

import httpx
import pytest
from ray import serve

from serve_apps.gpt_neo import app as gpt_neo_app

# 8 blocks x 8 tokens: one sequence of 4 + 40 tokens (6 blocks) fits at a time; 20 requests are 20x that,
# arriving faster than one finishes however fast the engine steps
DEEP = {"replica_cpus": 0.25, "kv_cache_blocks": 8, "block_size": 8, "max_num_seqs": 4, "max_queued_requests": 1024}
# one-token prompts + 60 tokens = 8 blocks each: two run (no preemption), at most 3 wait (queued =
# admitted but not yet started, so the count of 200s depends on when the first step starts)
SHALLOW = {"replica_cpus": 0.25, "kv_cache_blocks": 16, "block_size": 8, "max_num_seqs": 2, "max_queued_requests": 3}


@pytest.fixture(scope="module")
def urls(serve_port):
    serve.run(gpt_neo_app(DEEP), name="deep", route_prefix="/deep")
    serve.run(gpt_neo_app(SHALLOW), name="shallow", route_prefix="/shallow")
    yield {name: f"http://127.0.0.1:{serve_port}/{name}" for name in ("deep", "shallow")}
    serve.delete("deep")
    serve.delete("shallow")


class HealthWatch:
    """Polls /healthz in a thread while a load runs; keeps the largest waiting / queued counts seen."""

    def __init__(self, url: str):
        self.url, self.max_waiting, self.max_queued, self.polls = url, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                health = http.get(self.url + "/healthz").json()
                self.max_waiting = max(self.max_waiting, health["waiting"])
                self.max_queued = max(self.max_queued, health["queued"])
                self.polls += 1
                time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(15)


async def staggered(url: str, bodies: list[dict], gap_s: float) -> list[tuple[httpx.Response, float]]:
    """POST each body `gap_s` after the previous one, all in flight together; (reply, finish time) each."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        async def one(i: int, body: dict):
            await asyncio.sleep(i * gap_s)
            reply = await http.post("/v1/completions", json=body)
            return reply, time.monotonic()
        return await asyncio.gather(*[one(i, b) for i, b in enumerate(bodies)])


def test_twenty_times_the_kv_cache_all_complete_in_arrival_order_with_one_by_one_outputs(urls):
    url = urls["deep"]
    bodies = [{"prompt": f"p{i:02d}", "max_tokens": 40, "temperature": 0, "ignore_eos": True} for i in range(20)]
    with HealthWatch(url) as watch:
        replies = asyncio.run(staggered(url, bodies, gap_s=0.05))   # faster, and Serve's router reorders them
    assert [r.status_code for r, _ in replies] == [200] * 20
    assert watch.max_waiting >= 2            # the surplus really queued (the poll may miss the peak)
    finish_rank = {i: rank for rank, (i, _) in enumerate(sorted(enumerate(t for _, t in replies),
                                                                  key=lambda x: x[1]))}
    assert all(abs(finish_rank[i] - i) < DEEP["max_num_seqs"] for i in range(20)), finish_rank   # FIFO
    texts = [r.json()["choices"][0]["text"] for r, _ in replies]
    one_by_one = [httpx.post(url + "/v1/completions", json=b, timeout=60).json()["choices"][0]["text"]
                  for b in bodies]
    assert texts == one_by_one
    assert httpx.get(url + "/healthz", timeout=10).json()["kv_blocks_used"] == 0


def test_small_queue_refuses_the_surplus_with_503_and_stays_bounded(urls):
    url = urls["shallow"]
    body = {"prompt": "x", "max_tokens": 60, "ignore_eos": True}
    with HealthWatch(url) as watch:
        replies = asyncio.run(staggered(url, [body] * 30, gap_s=0.0))
    codes = [r.status_code for r, _ in replies]
    # a burst that lands before the engine starts any sequence gets just the 3 queue places; requests that
    # land after a step has started two of them find those two places free again (CI saw 4, a laptop 5)
    assert set(codes) == {200, 503} and codes.count(200) >= SHALLOW["max_queued_requests"], codes
    assert watch.polls > 0 and watch.max_waiting <= 3 and watch.max_queued <= 3, vars(watch)
    for reply, _ in replies:
        if reply.status_code == 503:
            assert reply.headers["retry-after"] == "1"
            error = reply.json()["error"]
            assert error["type"] == "server_overloaded" and "limit 3" in error["message"]
        else:
            assert reply.json()["usage"]["completion_tokens"] == 60
    health = httpx.get(url + "/healthz", timeout=10).json()
    assert health["queued"] == 0 and health["waiting"] == 0 and health["kv_blocks_used"] == 0
