"""A TP=2 Serve replica whose follower rank dies (SIGKILL) or stalls (SIGSTOP) mid-generation: every
request in flight ends with a clear error (503 / an SSE error event / an exception on the handle),
the replica reports unhealthy, Serve replaces it, and requests succeed again."""
import concurrent.futures as cf
import json
import os
import signal
import threading
import time

import httpx
import pytest
from ray import serve

from serve_apps.gpt_neo import app as gpt_neo_app

STEP_TIMEOUT_S = 3
ARGS = {"tp_size": 2, "replica_cpus": 0.5, "worker_cpus": 0.5, "kv_cache_blocks": 160, "block_size": 8,
        "max_num_seqs": 8, "health_check_period_s": 1, "step_timeout_s": STEP_TIMEOUT_S}
LONG = {"prompt": "x", "max_tokens": 240, "ignore_eos": True}           # the demo model holds 256 positions


@pytest.fixture(scope="module")
def app(serve_port):
    serve.run(gpt_neo_app(ARGS), name="failover", route_prefix="/failover")
    yield f"http://127.0.0.1:{serve_port}/failover", serve.get_app_handle("failover")
    serve.delete("failover")


def follower_pid(handle) -> int:
    (rank1,) = [r for r in handle.ranks.remote().result(timeout_s=30) if r["rank"] == 1]
    return rank1["pid"]


def wait_until_serving(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                ok = httpx.post(url + "/v1/completions", json={"prompt": "ok", "max_tokens": 3, "ignore_eos": True}, timeout=30)
                assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no healthy replica within {timeout}s")


def streamed(url: str, started: threading.Event) -> list[dict | str]:
    """SSE events of a long completion; `started` is set at the first chunk."""
    events = []
    with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                started.set()
    return events


def fail_mid_generation(url: str, handle, sig: int) -> tuple[list, float]:
    """Two unary requests, a stream and a handle call in flight; `sig` to the follower at the first streamed
    chunk. Returns [unary, unary, stream events, handle error] and the seconds until the last one ended."""
    pid, started = follower_pid(handle), threading.Event()
    with cf.ThreadPoolExecutor(4) as pool:
        unary = [pool.submit(httpx.post, url + "/v1/completions", json=LONG, timeout=60) for _ in range(2)]
        stream = pool.submit(streamed, url, started)
        call = handle.generate.remote("x", max_new_tokens=240, ignore_eos=True)
        assert started.wait(30)
        os.kill(pid, sig)
        start = time.monotonic()
        try:
            call.result(timeout_s=40)
            handle_error = None
        except Exception as e:                                     # noqa: BLE001  (any error, as long as it comes)
            handle_error = e
        results = [f.result(timeout=40) for f in unary] + [stream.result(timeout=40), handle_error]
    return results, time.monotonic() - start


def assert_clear_errors(results: list, message: str) -> None:
    *unary, events, handle_error = results
    for reply in unary:
        assert reply.status_code == 503 and reply.headers["retry-after"], reply.text
        assert reply.json()["error"]["type"] == "server_error" and message in reply.json()["error"]["message"]
    assert events[-1] == "[DONE]" and "error" in events[-2] and message in events[-2]["error"]["message"]
    assert handle_error is not None and message in str(handle_error)


def gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.2)
    return False


def assert_unhealthy_then_replaced(url: str, handle, old_pid: int) -> None:
    assert httpx.get(url + "/healthz", timeout=10).status_code == 503
    with pytest.raises(Exception, match="TP group|engine"):       # Serve's own check, before it replaces us
        handle.check_health.remote().result(timeout_s=10)
    wait_until_serving(url)
    assert follower_pid(handle) != old_pid and gone(old_pid)     # a stalled rank is killed with its replica


def test_follower_killed_mid_generation_fails_in_flight_requests_then_serve_replaces_the_replica(app):
    url, handle = app
    wait_until_serving(url)
    pid = follower_pid(handle)
    results, elapsed = fail_mid_generation(url, handle, signal.SIGKILL)
    assert elapsed < 30
    assert_clear_errors(results, "rank 1 died")
    assert_unhealthy_then_replaced(url, handle, pid)


def test_follower_stalled_mid_generation_is_caught_by_the_step_timeout(app):
    url, handle = app
    wait_until_serving(url)
    pid = follower_pid(handle)
    try:
        results, elapsed = fail_mid_generation(url, handle, signal.SIGSTOP)
        assert elapsed < STEP_TIMEOUT_S + 10
        assert_clear_errors(results, f"step_timeout_s={STEP_TIMEOUT_S}")
        assert_unhealthy_then_replaced(url, handle, pid)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)                            # normally gone with its replica already
        except ProcessLookupError:
            pass
