"""Cancellation frees the request's KV blocks at the next step: an HTTP client that hangs up
(streaming or not, completions and chat) and a Python handle call that is cancelled."""
import time

import httpx
import pytest
from ray import serve

from serve_apps.gpt_neo import app as gpt_neo_app

ARGS = {"replica_cpus": 0.25, "kv_cache_blocks": 256, "block_size": 8, "max_num_seqs": 16}
TOKENS = 200                                          # + the chat prompt: within the demo's 256 positions
LONG = {"max_tokens": TOKENS, "ignore_eos": True, "n": 4}


@pytest.fixture(scope="module")
def app(serve_port):
    serve.run(gpt_neo_app(ARGS), name="cancel", route_prefix="/cancel")
    yield f"http://127.0.0.1:{serve_port}/cancel", serve.get_app_handle("cancel")
    serve.delete("cancel")


def health(url: str) -> dict:
    return httpx.get(url + "/healthz", timeout=10).json()


def wait_for(url: str, busy: bool, timeout: float = 20.0) -> dict:
    """Health once blocks are in use (`busy`) or all back (not `busy`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(url)
        if bool(h["kv_blocks_used"]) == busy and (busy or h["running"] == h["waiting"] == 0):
            return h
        time.sleep(0.05)
    raise AssertionError(f"blocks still {'free' if busy else 'in use'} after {timeout}s: {health(url)}")


def assert_freed_before_the_end(url: str, steps_before: int) -> None:
    wait_for(url, busy=False)
    assert health(url)["steps"] - steps_before < TOKENS            # aborted, not run to the end


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": "long"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "long"}]}),
])
def test_streaming_client_hanging_up_frees_blocks(app, route, body):
    url, _ = app
    steps = wait_for(url, busy=False)["steps"]
    with httpx.stream("POST", url + route, json={**body, **LONG, "stream": True}, timeout=60) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if '"text": "' in line or '"content": "' in line and '"content": ""' not in line:
                break                                             # the first generated text, then hang up
        else:
            raise AssertionError("no text streamed")
    assert_freed_before_the_end(url, steps)


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": "long"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "long"}]}),
])
def test_unary_client_hanging_up_frees_blocks(app, route, body):
    url, _ = app
    steps = wait_for(url, busy=False)["steps"]
    with httpx.Client(timeout=httpx.Timeout(60, read=0.15)) as http:
        with pytest.raises(httpx.ReadTimeout):      # gives up after 0.15 s (the whole request: 200 steps) and hangs up
            http.post(url + route, json={**body, **LONG})
    assert_freed_before_the_end(url, steps)


@pytest.mark.parametrize("streaming", [False, True])
def test_cancelled_handle_call_frees_blocks(app, streaming):
    url, handle = app
    steps = wait_for(url, busy=False)["steps"]
    if streaming:
        response = handle.options(stream=True).generate_stream.remote("long", max_tokens=TOKENS, ignore_eos=True)
    else:
        response = handle.generate.remote("long", max_new_tokens=TOKENS, ignore_eos=True)
    wait_for(url, busy=True)
    response.cancel()
    assert_freed_before_the_end(url, steps)
    assert handle.generate.remote("ok", max_new_tokens=2, ignore_eos=True).result(timeout_s=30)["token_ids"]
