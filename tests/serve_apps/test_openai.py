"""The GPT-Neo app on the embedded demo model, through the real `openai` client and raw HTTP."""
import asyncio
import json
import time

import httpx
import openai
import pytest
from ray import serve

from serve_apps.demo_model import MODEL_NAME
from serve_apps.gpt_neo import app as gpt_neo_app

ARGS = {"replica_cpus": 0.5, "max_num_seqs": 16, "kv_cache_blocks": 96, "block_size": 8,
        "health_check_period_s": 2}


@pytest.fixture(scope="module")
def base_url(serve_port):
    serve.run(gpt_neo_app(ARGS), name="neo", route_prefix="/")
    yield f"http://127.0.0.1:{serve_port}"
    serve.delete("neo")


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def health(base_url) -> dict:
    return httpx.get(base_url + "/healthz").json()


def test_models_lists_the_random_weight_demo(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert "random" in MODEL_NAME


def test_completion_greedy_is_deterministic_with_usage(client):
    a = client.completions.create(model=MODEL_NAME, prompt="DeepSpeed is", max_tokens=12, temperature=0)
    b = client.completions.create(model=MODEL_NAME, prompt="DeepSpeed is", max_tokens=12, temperature=0)
    assert a.choices[0].text == b.choices[0].text and a.choices[0].finish_reason == "length"
    assert a.usage.prompt_tokens == len(b"DeepSpeed is") and a.usage.completion_tokens == 12


def test_streaming_equals_unary(client):
    unary = client.completions.create(model=MODEL_NAME, prompt="Ray Serve", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="Ray Serve", max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == unary.choices[0].text
    assert chunks[-1].usage.completion_tokens == 16


def test_chat_and_chat_streaming_with_n(client):
    messages = [{"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, n=2, seed=1)
    assert len(out.choices) == 2 and all(c.message.role == "assistant" for c in out.choices)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
                                            stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    greedy = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0)
    assert text == greedy.choices[0].message.content


def test_stop_string_cuts_the_text(client):
    free = client.completions.create(model=MODEL_NAME, prompt="abc", max_tokens=24, temperature=0).choices[0].text
    stop = free[5:7]
    cut = client.completions.create(model=MODEL_NAME, prompt="abc", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[:free.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_32_concurrent_requests_are_batched_and_equal_one_by_one(base_url):
    prompts = [("x" * (i % 7 + 1)) + str(i) for i in range(32)]
    lengths = [4 + i % 9 for i in range(32)]

    async def run_all():
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
            replies = await asyncio.gather(*[http.post("/v1/completions", json={
                "prompt": p, "max_tokens": n, "temperature": 0}) for p, n in zip(prompts, lengths)])
            return [r.json()["choices"][0]["text"] for r in replies]

    steps_before = health(base_url)["steps"]
    together = asyncio.run(run_all())
    steps = health(base_url)["steps"] - steps_before
    assert steps < sum(lengths) / 2                      # batched: far fewer steps than tokens
    one_by_one = [httpx.post(base_url + "/v1/completions", json={"prompt": p, "max_tokens": n, "temperature": 0},
                             timeout=60).json()["choices"][0]["text"] for p, n in zip(prompts[:8], lengths[:8])]
    assert together[:8] == one_by_one


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100000}, 400, None),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "x" * 300}, 400, None),
    ({"prompt": 12}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": 1, "echo": True}, 400, None),
    ({"prompt": "x", "suffix": "y"}, 400, None),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(base_url, body, status, param):
    reply = httpx.post(base_url + "/v1/completions", json=body, timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"] and (param is None or error["param"] == param)
    ok = httpx.post(base_url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_completion_logprobs_unary_and_streamed(client):
    """logprobs=2: per generated token its text, log-probability, two alternatives and text offset;
    greedy picks are the most likely token; a stream's chunks carry the same, token for token."""
    out = client.completions.create(model=MODEL_NAME, prompt="DeepSpeed is", max_tokens=6, temperature=0,
                                    logprobs=2, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(x <= 0 for x in lp.token_logprobs) and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    for picked, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(picked, abs=1e-5)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="DeepSpeed is", max_tokens=6, temperature=0,
                                            logprobs=2, extra_body={"ignore_eos": True}, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((s.tokens for s in streamed), []) == lp.tokens
    assert sum((s.token_logprobs for s in streamed), []) == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset
    assert client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2).choices[0].logprobs is None


def test_chat_logprobs_and_top_logprobs(client, base_url):
    messages = [{"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    for token in content:
        assert token.logprob <= 0 and token.bytes == list(token.token.encode()) and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-5)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2).choices[0].logprobs is None
    reply = httpx.post(base_url + "/v1/chat/completions", timeout=30,
                       json={"messages": messages, "top_logprobs": 2})
    assert reply.status_code == 400 and "logprobs" in reply.json()["error"]["message"]


def test_echo_starts_the_text_with_the_prompt(client):
    plain = client.completions.create(model=MODEL_NAME, prompt="Ray", max_tokens=5, temperature=0)
    echoed = client.completions.create(model=MODEL_NAME, prompt="Ray", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "Ray" + plain.choices[0].text
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="Ray", max_tokens=5, temperature=0,
                                            echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echoed.choices[0].text


def test_malformed_json_is_400(base_url):
    reply = httpx.post(base_url + "/v1/completions", content=b"{not json", timeout=30,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "error" in reply.json()


def test_client_disconnect_frees_kv_blocks(base_url):
    with httpx.stream("POST", base_url + "/v1/completions", timeout=60, json={
            "prompt": "long", "max_tokens": 200, "stream": True, "ignore_eos": True}) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                break                                     # one chunk, then hang up
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (health(base_url)["kv_blocks_used"] or health(base_url)["running"]):
        time.sleep(0.2)
    assert health(base_url)["kv_blocks_used"] == 0


def test_python_handle_generate_and_stream(base_url):
    handle = serve.get_app_handle("neo")
    out = handle.generate.remote("DeepSpeed is", max_new_tokens=5, ignore_eos=True).result()
    assert len(out["token_ids"]) == 5 and isinstance(out["text"], str) and "logprobs" not in out
    scored = handle.generate.remote("DeepSpeed is", max_new_tokens=5, ignore_eos=True, logprobs=2).result()
    assert [t["token_id"] for t in scored["logprobs"]] == scored["token_ids"] == out["token_ids"]
    assert all(len(t["top"]) == 2 and t["logprob"] <= 0 for t in scored["logprobs"])
    pieces = list(handle.options(stream=True).generate_stream.remote("DeepSpeed is", max_tokens=5, temperature=0))
    greedy = handle.generate.remote("DeepSpeed is", max_new_tokens=5).result()
    assert "".join(pieces) == greedy["text"]


def test_sse_format_ends_with_done(base_url):
    with httpx.stream("POST", base_url + "/v1/completions", timeout=60,
                      json={"prompt": "a", "max_tokens": 3, "stream": True}) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(l.startswith("data: ") for l in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_tokenize_and_detokenize_as_vllm_does(client, base_url):
    """/tokenize counts what a completion or a chat completion would see (their usage says the same);
    /detokenize reverses it; unknown models are 404, bad bodies 400, both in OpenAI's error shape."""
    text = "héllo, wörld"
    out = httpx.post(base_url + "/tokenize", json={"model": MODEL_NAME, "prompt": text}).json()
    assert out["tokens"] == list(text.encode()) and out["count"] == len(text.encode()) and out["max_model_len"] > 0
    assert httpx.post(base_url + "/detokenize", json={"tokens": out["tokens"]}).json() == {"prompt": text}
    messages = [{"role": "user", "content": "hello"}]
    chat = httpx.post(base_url + "/tokenize", json={"messages": messages}).json()
    usage = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens
    bare = httpx.post(base_url + "/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["count"] < chat["count"]
    for path, body, status, param in [
            ("/tokenize", {"prompt": "x", "messages": messages}, 400, None),
            ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
            ("/detokenize", {"tokens": [1, -5]}, 400, None),
            ("/detokenize", {"tokens": "abc"}, 400, "tokens")]:
        reply = httpx.post(base_url + path, json=body)
        assert reply.status_code == status, (path, body, reply.text)
        error = reply.json()["error"]
        assert error["message"] and (param is None or error["param"] == param)


def test_retrieve_model_and_vllm_health_route(client, base_url):
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("gpt-4")
    assert httpx.get(base_url + "/health").status_code == 200
