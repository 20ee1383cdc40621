"""A short soak (bench/soak.py) against the demo app on the session's Serve: nothing fails, nothing
is lost, and the report carries latency, TTFT and provenance."""
import json

import pytest
from ray import serve

from bench import soak
from serve_apps.gpt_neo import app as gpt_neo_app

ARGS = {"replica_cpus": 0.25, "max_num_seqs": 8, "kv_cache_blocks": 96, "block_size": 8}
N = 40


@pytest.fixture(scope="module")
def url(serve_port):
    serve.run(gpt_neo_app(ARGS), name="soak", route_prefix="/soak")
    yield f"http://127.0.0.1:{serve_port}/soak"
    serve.delete("soak")


def test_short_soak_completes_every_request(url, tmp_path):
    out = tmp_path / "soak.json"
    result = soak.main(["--url", url, "--requests", str(N), "--duration", "10", "--concurrency", "6",
                        "--max-tokens", "16", "--out", str(out)])
    assert result["failed"] == 0 and result["completed"] == N, result["failures"]
    assert result["streamed"] == N // 2 and result["output_tokens"] > 0
    assert 0 < result["latency_s"]["p50"] <= result["latency_s"]["p90"] <= result["latency_s"]["p99"]
    assert 0 < result["ttft_s"]["p50"] <= result["ttft_s"]["p99"] <= result["latency_s"]["max"]
    assert result["health"].get("unhealthy_polls", 0) == 0 and result["health"]["max_running"] > 0
    assert result["commit"] and result["date"] and result["machine"]["cores"]
    assert json.loads(out.read_text()) == result
