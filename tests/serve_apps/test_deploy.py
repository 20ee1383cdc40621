"""Deployment shape: bundles per TP group, autoscaling by whole TP groups, API key, overload,
and `serve build` on the app."""
import time

import httpx
import pytest
import ray
from ray import serve

from serve_apps.args import AppArgs
from serve_apps.gpt_neo import app as gpt_neo_app


def test_bundles_hold_one_tp_group_with_the_replica_in_bundle_0():
    options = AppArgs.parse({"tp_size": "4", "replica_cpus": "2", "worker_cpus": "1"}).deployment_options(True)
    assert options["placement_group_bundles"] == [{"CPU": 2.0, "GPU": 1}] + [{"CPU": 1.0, "GPU": 1}] * 3
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 1}
    assert options["placement_group_strategy"] == "STRICT_PACK"


@pytest.mark.parametrize("args, field", [({"tp_size": "0"}, "tp_size"), ({"min_replicas": 3, "max_replicas": 2},
                                                                          "min_replicas"), ({"nope": 1}, "nope")])
def test_bad_app_arguments_name_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        AppArgs.parse(args)


def test_api_key_and_overload(serve_port):
    args = {"replica_cpus": 0.5, "api_key": "sekret", "max_queued_requests": 1, "max_num_seqs": 1,
            "kv_cache_blocks": 64, "block_size": 8}
    serve.run(gpt_neo_app(args), name="keyed", route_prefix="/keyed")
    url = f"http://127.0.0.1:{serve_port}/keyed/v1/completions"
    try:
        body = {"prompt": "x", "max_tokens": 2}
        assert httpx.post(url, json=body, timeout=30).status_code == 401
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer no"}, timeout=30)
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": "Bearer sekret"}
        assert httpx.post(url, json=body, headers=auth, timeout=30).status_code == 200
        # one running, one queued: the next requests are refused with 503 + Retry-After, never queued unboundedly
        import concurrent.futures as cf
        long = {"prompt": "x", "max_tokens": 150, "ignore_eos": True}
        with cf.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: httpx.post(url, json=long, headers=auth, timeout=120), range(8)))
        codes = sorted(r.status_code for r in replies)
        assert 200 in codes and 503 in codes, codes
        refused = next(r for r in replies if r.status_code == 503)
        assert refused.headers["retry-after"] and refused.json()["error"]["type"] == "server_overloaded"
    finally:
        serve.delete("keyed")


def test_the_router_queue_is_bounded_too(serve_port):
    """Past max_ongoing_requests a request waits at Serve's router; past router_queue_limit Serve
    refuses it with 503 at once instead of queueing without bound (our engine queue is left large)."""
    args = {"replica_cpus": 0.5, "max_ongoing_requests": 1, "router_queue_limit": 1, "max_num_seqs": 1,
            "kv_cache_blocks": 64, "block_size": 8}
    serve.run(gpt_neo_app(args), name="routed", route_prefix="/routed")
    url = f"http://127.0.0.1:{serve_port}/routed/v1/completions"
    try:
        import concurrent.futures as cf
        long = {"prompt": "x", "max_tokens": 150, "ignore_eos": True}
        with cf.ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda _: httpx.post(url, json=long, timeout=120), range(6)))
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) >= 1 and 503 in codes, codes
    finally:
        serve.delete("routed")


def test_autoscaling_adds_and_removes_whole_tp_groups(serve_port):
    args = {"tp_size": 2, "replica_cpus": 0.5, "worker_cpus": 0.5, "min_replicas": 1, "max_replicas": 2,
            "target_ongoing_requests": 1, "upscale_delay_s": 0, "downscale_delay_s": 2, "metrics_interval_s": 0.5,
            "look_back_period_s": 2, "kv_cache_blocks": 64, "block_size": 8}
    serve.run(gpt_neo_app(args), name="scaled", route_prefix="/scaled")
    url = f"http://127.0.0.1:{serve_port}/scaled/v1/completions"

    def replicas() -> int:
        app = serve.status().applications["scaled"]
        return app.deployments["LLMDeployment"].replica_states.get("RUNNING", 0)

    def free_cpus() -> float:
        return ray.available_resources().get("CPU", 0)

    try:
        assert replicas() == 1
        cpus_one_group = free_cpus()
        import concurrent.futures as cf
        import threading
        body = {"prompt": "x", "max_tokens": 120, "ignore_eos": True}
        loaded = threading.Event()

        def client() -> list[int]:                  # keeps one request in flight until the load stops
            codes = []
            while not loaded.is_set():
                codes.append(httpx.post(url, json=body, timeout=180).status_code)
            return codes

        with cf.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client) for _ in range(6)]
            deadline = time.monotonic() + 90
            while replicas() < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            scaled_up, cpus_two_groups = replicas(), free_cpus()
            loaded.set()
            assert scaled_up == 2
            assert cpus_two_groups == pytest.approx(cpus_one_group - 1.0)   # a second group: 2 bundles x 0.5 CPU
            assert all(code == 200 for f in futures for code in f.result())
        deadline = time.monotonic() + 90
        while replicas() > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert replicas() == 1
    finally:
        serve.delete("scaled")


def test_serve_config_yaml_parses_and_builds():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(open("serve_apps/gpt_neo.yaml")))
    (application,) = config.applications
    module, name = application.import_path.split(":")
    builder = getattr(__import__(module, fromlist=[name]), name)
    assert isinstance(builder(application.args), serve.Application)


def test_serve_build_writes_a_config_that_parses(tmp_path):
    import os
    import subprocess
    import sys

    import yaml
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "built.yaml"
    serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")
    env = dict(os.environ, RAYSPEED_CACHE=str(tmp_path / "cache"), RAY_AUTH_MODE="disabled")
    done = subprocess.run([serve_cli, "build", "serve_apps.gpt_neo:application", "-o", str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    config = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    assert config.applications[0].import_path == "serve_apps.gpt_neo:application"
