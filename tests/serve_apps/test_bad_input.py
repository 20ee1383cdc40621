"""Bad input at the HTTP door, fuzzed with hypothesis: wrong types and ranges, unicode, oversized and
deeply nested bodies, wrong content types. Every answer is a 200 (valid requests) or a 4xx in
OpenAI's error shape, never a 5xx or a hang, and the server keeps serving. Security: the API key
guards every /v1 route (streaming too); bodies over `max_body_bytes` get a 413.
(Checkpoints are never executed: tests/actors/test_checkpoint.py::test_bin_with_pickled_code_is_refused
and tests/actors/test_megatron.py::test_pickled_code_is_refused.)"""
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve

from serve_apps.demo_model import MODEL_NAME
from serve_apps.gpt_neo import app as gpt_neo_app

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 4096
ARGS = {"replica_cpus": 0.25, "api_key": KEY, "max_body_bytes": MAX_BODY, "kv_cache_blocks": 128, "block_size": 8,
        "max_num_seqs": 16}
FUZZ = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def url(serve_port):
    serve.run(gpt_neo_app(ARGS), name="doors", route_prefix="/doors")
    yield f"http://127.0.0.1:{serve_port}/doors"
    serve.delete("doors")


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=30, headers=AUTH) as client:
        yield client


# -- strategies -------------------------------------------------------------------------------

anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
small_int = st.integers(-3, 12) | st.sampled_from([0, 2**31, 2**63, 2**64, -2**63 - 1, 10**30])
real = st.floats(-3, 3) | st.sampled_from([0.0, 1e-300, 1e-6, 1e300, -0.0, 2.0, 2.0000001])
token_ids = st.lists(st.integers(-2, 330) | st.sampled_from([2**40]), min_size=0, max_size=6)
prompt = st.text(max_size=40) | token_ids | st.lists(st.text(max_size=10), max_size=3) | st.lists(token_ids, max_size=3)
stop = st.none() | st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=6)
TYPED = {"model": st.sampled_from([MODEL_NAME, "gpt-4", ""]), "max_tokens": st.integers(1, 12) | small_int,
         "temperature": real, "top_p": real, "top_k": small_int, "n": st.integers(1, 4) | small_int, "stop": stop,
         "seed": small_int, "stream": st.booleans(), "stream_options": st.just({"include_usage": True}),
         "repetition_penalty": real, "min_tokens": small_int, "ignore_eos": st.booleans(), "presence_penalty": real,
         "logprobs": st.none() | st.booleans() | small_int, "user": st.text(max_size=5)}
LOOSE = {name: values | anything for name, values in TYPED.items()} | {"unknown_field": anything}
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot"]),
                                 "content": st.text(max_size=30)})
completion_body = (st.fixed_dictionaries({"prompt": prompt}, optional=TYPED) |           # mostly valid types
                   st.fixed_dictionaries({"prompt": prompt | anything}, optional=LOOSE))
chat_body = (st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=3)},
                                   optional={**TYPED, "max_completion_tokens": small_int}) |
             st.fixed_dictionaries({"messages": st.lists(message | anything, max_size=3) | anything},
                                   optional={**LOOSE, "max_completion_tokens": small_int | anything}))
# in range for the protocol (so every request reaches the engine), with the extremes of each range
EDGY = {"max_tokens": st.integers(1, 8), "temperature": st.sampled_from([0.0, 1e-300, 1e-6, 1e-5, 0.5, 2.0]),
        "top_p": st.sampled_from([1e-300, 1e-6, 0.5, 1.0]), "top_k": st.sampled_from([0, 1, 319, 320, 2**63, 2**70]),
        "n": st.integers(1, 3), "seed": st.sampled_from([None, 0, -1, 2**63, 2**64 - 1, 2**64, -2**63 - 1]),
        "repetition_penalty": st.sampled_from([1e-300, 1e-3, 1.0, 1e3, 1e300]), "min_tokens": st.integers(0, 8),
        "stop": st.none() | st.lists(st.text(min_size=1, max_size=4), max_size=4), "ignore_eos": st.booleans(),
        "stream": st.booleans()}
in_range_body = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20)}, optional=EDGY)
CONTENT_TYPES = [None, "application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]


@st.composite
def raw_body(draw, bodies) -> tuple[bytes, str | None]:
    """A body as bytes (JSON of a drawn body; or nested, oversized, truncated, binary) and a content type."""
    kind = draw(st.sampled_from(["json"] * 5 + ["nested", "oversized", "truncated", "binary", "scalar"]))
    if kind == "nested":
        depth = draw(st.integers(50, 5000))
        raw = ('{"prompt": ' + "[" * depth + "1" + "]" * depth + "}").encode()
    elif kind == "oversized":
        raw = json.dumps({"prompt": "x" * draw(st.integers(MAX_BODY, 3 * MAX_BODY))}).encode()
    elif kind == "binary":
        raw = draw(st.binary(max_size=64))
    elif kind == "scalar":
        raw = json.dumps(draw(anything)).encode()
    else:
        raw = json.dumps(draw(bodies), ensure_ascii=draw(st.booleans())).encode()
        raw = raw[:draw(st.integers(0, len(raw)))] if kind == "truncated" else raw
    return raw, draw(st.sampled_from(CONTENT_TYPES))


# -- checks -----------------------------------------------------------------------------------

def check_reply(reply: httpx.Response) -> None:
    """200 (a complete answer or SSE stream ending in [DONE]) or a 4xx with OpenAI's error body."""
    if reply.status_code == 200:
        if reply.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events[:-1]), events[-3:]
        else:
            assert reply.json()["choices"]
        return
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text[:500])
    error = reply.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"], error
    assert set(error) == {"message", "type", "param", "code"}


def post(http: httpx.Client, url: str, raw: bytes, content_type: str | None) -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return http.post(url, content=raw, headers=headers)


def assert_still_serving(http: httpx.Client, url: str) -> None:
    ok = http.post(url + "/v1/completions", json={"prompt": "still there?", "max_tokens": 3, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    health = http.get(url + "/healthz").json()
    assert health["alive"] and health["queued"] == 0


@FUZZ
@given(body=raw_body(completion_body))
def test_fuzzed_completions_get_200_or_a_4xx_error(url, http, body):
    check_reply(post(http, url + "/v1/completions", *body))


@FUZZ
@given(body=raw_body(chat_body))
def test_fuzzed_chat_completions_get_200_or_a_4xx_error(url, http, body):
    check_reply(post(http, url + "/v1/chat/completions", *body))


@settings(FUZZ, max_examples=40)
@given(body=in_range_body)
def test_fuzzed_in_range_sampling_never_breaks_the_engine(url, http, body):
    reply = http.post(url + "/v1/completions", json=body)
    check_reply(reply)
    if reply.status_code != 200:
        assert reply.status_code == 400 and "invalid sampling parameters" in reply.json()["error"]["message"]
    assert http.get(url + "/healthz").status_code == 200


def test_server_keeps_serving_after_the_fuzz(url, http):
    assert_still_serving(http, url)


@pytest.mark.parametrize("method, route", [("GET", "/v1/completions"), ("POST", "/v1/models"),
                                           ("GET", "/v1/nothing-here")])
def test_wrong_routes_and_methods_answer_in_openai_shape(url, http, method, route):
    reply = http.request(method, url + route)
    assert reply.status_code in (404, 405) and reply.json()["error"]["message"]


# -- security ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method, route, body", [
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{MODEL_NAME}", None),
    ("POST", "/tokenize", {"prompt": "x"}),
    ("POST", "/detokenize", {"tokens": [72]}),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                      "stream": True}),
])
def test_every_api_route_needs_the_api_key(url, method, route, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        reply = httpx.request(method, url + route, json=body, headers=headers, timeout=30)
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
        assert not reply.headers["content-type"].startswith("text/event-stream")
    reply = httpx.request(method, url + route, json=body, headers=AUTH, timeout=30)
    assert reply.status_code == 200


def test_body_over_the_limit_is_413_whether_declared_or_streamed(url, http):
    big = json.dumps({"prompt": "x" * MAX_BODY}).encode()
    declared = http.post(url + "/v1/completions", content=big)
    assert declared.status_code == 413 and "max_body_bytes=4096" in declared.json()["error"]["message"]
    chunked = http.post(url + "/v1/completions", content=iter([big[:1000], big[1000:]]))    # no content-length
    assert chunked.status_code == 413
    assert_still_serving(http, url)
