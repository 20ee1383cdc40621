"""The `rayspeed` launcher, run as a subprocess attached to the session's 4-CPU Ray cluster."""
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ALL_REDUCE = """
    import os, sys
    import torch, torch.distributed as dist
    print("env", *(f"{k}={os.environ[k]}" for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")))
    print("argv", sys.argv[1:])
    print("cwd", os.getcwd(), file=sys.stderr)
    dist.init_process_group("gloo", init_method="env://")
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    print("sum", total.item())
    dist.destroy_process_group()
"""

ONE_FAILS = """
    import os, pathlib, sys, time
    sleeper = pathlib.Path("sleeper.pid")
    if os.environ["RANK"] == "0":  # fails once rank 1 is asleep, as if waiting on a dead peer
        while not sleeper.exists():
            time.sleep(0.1)
        sys.exit(3)
    sleeper.write_text(str(os.getpid()))
    time.sleep(600)
"""


@pytest.fixture
def cluster(ray_cluster):
    """The session cluster; afterwards every CPU is free again (no placement group left behind)."""
    yield ray_cluster
    deadline = time.monotonic() + 10
    while ray_cluster.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU", 0) == 4
    live = [pg for pg in ray_cluster.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    assert live == []


def rayspeed(cluster, tmp_path, script: str, *flags: str, timeout: float = 40) -> subprocess.CompletedProcess:
    (tmp_path / "script.py").write_text(textwrap.dedent(script))
    address = cluster.get_runtime_context().gcs_address
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "rayspeed.cli", "--address", address, *flags, "script.py", "--extra", "x"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def lines_of(output: str, rank: int, word: str) -> list[str]:
    return [line.split(" ", 3)[3] for line in output.splitlines() if line.startswith(f"[rank {rank}] {word} ")]


def test_two_ranks_all_reduce_with_env_and_local_rank(cluster, tmp_path):
    result = rayspeed(cluster, tmp_path, ALL_REDUCE, "--num_gpus", "2")
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        assert lines_of(result.stdout, rank, "env") == [f"RANK={rank} LOCAL_RANK={rank} WORLD_SIZE=2 LOCAL_WORLD_SIZE=2"]
        assert lines_of(result.stdout, rank, "argv") == [f"['--local_rank={rank}', '--extra', 'x']"]
        assert lines_of(result.stdout, rank, "sum") == ["3.0"]
        assert lines_of(result.stderr, rank, "cwd") == [str(tmp_path)]


def test_no_local_rank_leaves_argv_alone(cluster, tmp_path):
    result = rayspeed(cluster, tmp_path, 'import sys; print("argv", sys.argv[1:])', "--num_gpus", "1",
                      "--no_local_rank")
    assert result.returncode == 0, result.stderr
    assert lines_of(result.stdout, 0, "argv") == ["['--extra', 'x']"]


def test_failing_rank_stops_the_others(cluster, tmp_path):
    started = time.monotonic()
    result = rayspeed(cluster, tmp_path, ONE_FAILS, "--num_gpus", "2")
    assert time.monotonic() - started < 30
    assert result.returncode == 3
    assert "rank 0 exited with code 3" in result.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "sleeper.pid").read_text()), 0)


def test_unsatisfiable_request_names_resources(cluster, tmp_path):
    started = time.monotonic()
    result = rayspeed(cluster, tmp_path, "pass", "--num_gpus", "2", "--cpus_per_rank", "100", "--timeout", "5")
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    message = result.stderr
    assert re.search(r"asked for 2 x \{'CPU': 100\.0\} \(PACK\)", message), message
    assert "4 CPU in all" in message


def test_num_nodes_checks_where_the_bundles_landed(cluster, tmp_path):
    result = rayspeed(cluster, tmp_path, "pass", "--num_gpus", "1", "--num_nodes", "2", "--timeout", "5")
    assert result.returncode == 1
    assert "asked for 2 nodes, but the 2 bundles landed on 1 node(s)" in result.stderr, result.stderr


SEED_SCRIPT = """
    # The seed's gpt-neo-2.7b-generation.py, unchanged but for the import and a tiny offline model.
    import os
    import torch
    import rayspeed
    from transformers import pipeline
    from tests.helpers import byte_tokenizer, tiny_model

    local_rank = int(os.getenv("LOCAL_RANK", "0"))
    world_size = int(os.getenv("WORLD_SIZE", "1"))
    generator = pipeline("text-generation", model=tiny_model("gpt_neo"), tokenizer=byte_tokenizer())
    generator.model = rayspeed.init_inference(generator.model, tensor_parallel={"tp_size": world_size},
                                              dtype=torch.float, replace_with_kernel_inject=True).module
    string = generator("DeepSpeed is", do_sample=False, max_new_tokens=24)
    print("text", repr(string[0]["generated_text"]))
"""


# Known intermittent failure (1 in ~6 full-suite runs on the 2-core CI box): rank 1 aborted with
# "terminate called without an active exception" and printed nothing. Likely cause, fixed: the gloo
# group was left to interpreter shutdown (an abort there also drops buffered stdout, hence no line);
# backends now destroys the group it started at exit. Not reproduced in isolation, so the test still
# re-runs up to twice until full-suite runs confirm the fix.
@pytest.mark.flaky(reruns=2)
def test_seed_style_script_shards_in_process_on_two_ranks(cluster, tmp_path):
    from transformers import pipeline

    from tests.helpers import byte_tokenizer, tiny_model

    result = rayspeed(cluster, tmp_path, SEED_SCRIPT, "--num_gpus", "2", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = pipeline("text-generation", model=tiny_model("gpt_neo"), tokenizer=byte_tokenizer())
    expected = repr(pipe("DeepSpeed is", do_sample=False, max_new_tokens=24)[0]["generated_text"])
    assert lines_of(result.stdout, 0, "text") == lines_of(result.stdout, 1, "text") == [expected]
