"""Tensor parallelism on Ray (gloo on CPU): TP=N equals TP=1 and HF; the InferenceGroup actor;
slice-only checkpoint reads; failures end with clear errors, never a hang."""
import json
import os
import signal
import time

import pytest
import ray
import torch

import rayspeed
from actors.checkpoint import save_checkpoint
from kernels.linear import TensorParallel
from kernels.model import CausalLM
from policies.registry import policy_for
from tests.helpers import byte_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("ray_cluster")
TP = dict(dtype=torch.float32, replace_with_kernel_inject=True, worker_cpus=0.5)


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def free_cpus_settle(expected: float = 4.0, timeout: float = 20.0) -> float:
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("CPU", 0)


@pytest.mark.parametrize("family, tp_size", [("gpt_neo", 2), ("gpt_neo", 4), ("gpt2", 2), ("llama", 2),
                                             ("llama", 4)])
def test_tp_matches_tp1_and_hf(family, tp_size):
    hf = tiny_model(family)
    tp1 = rayspeed.init_inference(hf, **TP)
    # at tp_size 2, rank 0 launches greedy decode steps ahead: followers get input tokens still on its device
    engine = rayspeed.init_inference(hf, tensor_parallel={"tp_size": tp_size}, run_ahead=tp_size == 2, **TP)
    try:
        ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, :7] = 0                                      # a left-padded row
        with torch.no_grad():
            expected = hf(ids, attention_mask=mask).logits[mask.bool()]
        got = engine.module(ids, attention_mask=mask).logits[mask.bool()]
        assert rel_err(got, tp1.module(ids, attention_mask=mask).logits[mask.bool()]) < 1e-5
        assert rel_err(got, expected) < 1e-4
        kwargs = dict(attention_mask=mask, max_new_tokens=24, min_new_tokens=24)
        assert torch.equal(engine.module.generate(ids, **kwargs), tp1.module.generate(ids, **kwargs))
        prompts = [[1, 2, 3], list(range(50, 90))]
        greedy = dict(max_new_tokens=12, ignore_eos=True)
        assert [o.outputs[0].token_ids for o in engine.generate(prompts, **greedy)] == \
               [o.outputs[0].token_ids for o in tp1.generate(prompts, **greedy)]
        sampled = dict(max_new_tokens=12, do_sample=True, temperature=1.3, seed=5, ignore_eos=True)
        assert [o.outputs[0].token_ids for o in engine.generate(prompts, **sampled)] == \
               [o.outputs[0].token_ids for o in tp1.generate(prompts, **sampled)]
        scored = [o.outputs[0].logprobs for o in engine.generate(prompts, logprobs=2, **greedy)]
        for got, want in zip(scored, [o.outputs[0].logprobs for o in tp1.generate(prompts, logprobs=2, **greedy)]):
            assert [t.token_id for t in got] == [t.token_id for t in want]
            assert [t.logprob for t in got] == pytest.approx([t.logprob for t in want], abs=1e-4)
    finally:
        engine.shutdown()
    assert free_cpus_settle() == 4.0                          # placement group released


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    hf = tiny_model("llama")
    path = str(tmp_path_factory.mktemp("llama"))
    save_checkpoint(hf, path, byte_tokenizer())
    return hf, path


def shard_bytes(hf, rank: int, tp_size: int) -> int:
    spec = policy_for(hf.config).spec(hf.config)
    with torch.device("meta"):
        model = CausalLM(spec, torch.float32, TensorParallel(rank, tp_size))
    return sum(p.numel() * 4 for p in model.parameters())


def test_inference_group_actor_generates_text_and_reads_only_its_slices(llama_ckpt):
    hf, path = llama_ckpt
    config = rayspeed.InferenceConfig(checkpoint=path, tensor_parallel={"tp_size": 2}, **TP)
    group = rayspeed.InferenceGroup.options(name="llama-test").remote(config)
    try:
        out = ray.get(group.generate.remote(["DeepSpeed is", "Ray"], max_new_tokens=10, ignore_eos=True))
        ids = torch.tensor([list(b"DeepSpeed is")])
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10)
        assert out[0].prompt == "DeepSpeed is" and out[0].outputs[0].token_ids == expected[0, 12:].tolist()
        assert isinstance(out[1].outputs[0].text, str)
        by_ids = ray.get(group.generate.remote([[1, 2, 3]], max_new_tokens=4, ignore_eos=True))
        assert len(by_ids[0].outputs[0].token_ids) == 4
        health = ray.get(group.health.remote())
        assert health["alive"] and health["kv_blocks_used"] == 0
        report = ray.get(group.model_info.remote())["report"]
        for rank in report["ranks"]:
            assert rank["bytes_read"] <= 1.1 * shard_bytes(hf, rank["rank"], 2) + 64 * 1024   # + headers, json
    finally:
        ray.get(group.shutdown.remote())
    assert free_cpus_settle() == 4.0


def test_s3_checkpoint_through_moto(llama_ckpt, s3):
    import s3fs

    hf, path = llama_ckpt
    s3fs.S3FileSystem(**s3).put(path + "/", "ckpt-bucket/tp-llama/", recursive=True)
    engine = rayspeed.init_inference(checkpoint="s3://ckpt-bucket/tp-llama", tensor_parallel={"tp_size": 2},
                                     storage_options=s3, **TP)
    try:
        ids = torch.randint(0, 256, (1, 16))
        with torch.no_grad():
            assert rel_err(engine.module(ids).logits, hf(ids).logits) < 1e-4
        assert engine.generate("DeepSpeed", max_new_tokens=3)[0].prompt == "DeepSpeed"
    finally:
        engine.shutdown()


def test_unsatisfiable_placement_fails_in_time_naming_resources(llama_ckpt):
    _, path = llama_ckpt
    start = time.monotonic()
    with pytest.raises(rayspeed.PlacementError, match=r"asked for 4 x \{'CPU': 2.0\}.*4 CPU in all"):
        rayspeed.init_inference(checkpoint=path, tensor_parallel={"tp_size": 4}, dtype=torch.float32,
                                replace_with_kernel_inject=True, worker_cpus=2.0, placement_timeout_s=3)
    assert time.monotonic() - start < 30
    assert free_cpus_settle() == 4.0


def test_tp_size_not_dividing_the_heads_is_refused_before_reserving(llama_ckpt):
    _, path = llama_ckpt
    with pytest.raises(rayspeed.ConfigError, match="tp_size=3 does not divide num_heads=4"):
        rayspeed.init_inference(checkpoint=path, tensor_parallel={"tp_size": 3}, **TP)
    assert free_cpus_settle() == 4.0


def test_rank_failing_to_load_tears_down_the_group(tmp_path):
    hf = tiny_model("gpt2")
    save_checkpoint(hf, str(tmp_path))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])         # truncated: some tensors lie past the end
    with pytest.raises(rayspeed.GroupError, match=r"rank \d failed while loading.*model.safetensors"):
        rayspeed.init_inference(checkpoint=str(tmp_path), tensor_parallel={"tp_size": 2}, **TP)
    assert free_cpus_settle() == 4.0


def test_rank_killed_mid_generation_fails_requests_clearly(llama_ckpt):
    _, path = llama_ckpt
    config = rayspeed.InferenceConfig(checkpoint=path, tensor_parallel={"tp_size": 2}, **TP)
    group = rayspeed.InferenceGroup.remote(config)
    try:
        ranks = ray.get(group.start.remote())["ranks"]
        in_flight = group.generate.remote([[1, 2, 3]] * 4, max_new_tokens=240, ignore_eos=True)
        time.sleep(1.0)
        os.kill(ranks[1]["pid"], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(rayspeed.GroupError, match="rank 1 died"):
            ray.get(in_flight, timeout=30)
        assert time.monotonic() - start < 30
        with pytest.raises(rayspeed.GroupError, match="TP group failed: rank 1 died"):
            ray.get(group.health.remote(), timeout=30)
    finally:
        ray.get(group.shutdown.remote())
    assert free_cpus_settle() == 4.0


def test_idle_group_outlives_its_collective_timeout(llama_ckpt):
    """Followers wait for rank 0's next plan inside a collective, which times out after
    rendezvous_timeout_s (gloo here, NCCL's watchdog on GPUs): an idle group is kept awake, so a
    request after twice that long a quiet spell still runs (without keepalives it failed: rank 1 died)."""
    _, path = llama_ckpt
    # 8 s leaves a slow rank start on a busy CI machine room to join the rendezvous
    config = rayspeed.InferenceConfig(checkpoint=path, tensor_parallel={"tp_size": 2}, rendezvous_timeout_s=8, **TP)
    group = rayspeed.InferenceGroup.remote(config)
    try:
        ray.get(group.start.remote())
        greedy = dict(max_new_tokens=4, ignore_eos=True)
        first = ray.get(group.generate.remote([[1, 2, 3]], **greedy))[0].outputs[0].token_ids
        time.sleep(17)
        assert ray.get(group.health.remote(), timeout=30)["alive"]
        assert ray.get(group.generate.remote([[1, 2, 3]], **greedy), timeout=30)[0].outputs[0].token_ids == first
    finally:
        ray.get(group.shutdown.remote())
    assert free_cpus_settle() == 4.0


def test_dropping_the_handle_right_after_shutdown_gives_the_bundles_back(llama_ckpt):
    """Ray ends a group actor whose last handle is gone at once, before the release that `shutdown`
    left due 0.2 s later: the actor's own end gives the placement group back (it leaked before)."""
    _, path = llama_ckpt
    group = rayspeed.InferenceGroup.remote(rayspeed.InferenceConfig(checkpoint=path, tensor_parallel={"tp_size": 2},
                                                                    **TP))
    ray.get(group.start.remote())
    ray.get(group.shutdown.remote())
    del group
    assert free_cpus_settle() == 4.0


def test_save_mp_checkpoint_then_reload_each_rank_reading_its_own_files(llama_ckpt, tmp_path):
    hf, path = llama_ckpt
    shards = str(tmp_path / "sharded")
    engine = rayspeed.init_inference(checkpoint=path, tensor_parallel={"tp_size": 2},
                                     save_mp_checkpoint_path=shards, **TP)
    ids = torch.randint(0, 256, (2, 20))
    expected = engine.module.generate(ids, max_new_tokens=16, min_new_tokens=16)
    engine.shutdown()
    described = json.loads((tmp_path / "sharded" / "ds_inference_config.json").read_text())
    assert described["type"] == "ds_model" and described["tp_size"] == 2
    assert described["checkpoints"]["tp"] == ["tp_00.safetensors", "tp_01.safetensors"]

    reloaded = rayspeed.init_inference(checkpoint=shards + "/ds_inference_config.json",
                                       tensor_parallel={"tp_size": 2}, **TP)
    try:
        assert torch.equal(reloaded.module.generate(ids, max_new_tokens=16, min_new_tokens=16), expected)
        assert reloaded.generate("DeepSpeed", max_new_tokens=2)[0].prompt == "DeepSpeed"   # tokenizer saved
        sizes = {f: (tmp_path / "sharded" / f).stat().st_size for f in ("non_tp.safetensors", "tp_00.safetensors")}
        report = ray.get(reloaded.backend.group.model_info.remote())["report"]
        for rank in report["ranks"]:                       # its own tp file + non_tp + small json files
            assert rank["bytes_read"] <= sizes["non_tp.safetensors"] + sizes["tp_00.safetensors"] + 64 * 1024
    finally:
        reloaded.shutdown()
    merged = rayspeed.init_inference(checkpoint=shards + "/ds_inference_config.json", **TP)        # TP 2 -> 1
    assert torch.equal(merged.module.generate(ids, max_new_tokens=16, min_new_tokens=16), expected)
    split = rayspeed.init_inference(checkpoint=shards + "/ds_inference_config.json",               # TP 2 -> 4
                                    tensor_parallel={"tp_size": 4}, **TP)
    try:
        assert torch.equal(split.module.generate(ids, max_new_tokens=16, min_new_tokens=16), expected)
        for rank in ray.get(split.backend.group.model_info.remote())["report"]["ranks"]:
            assert rank["bytes_read"] <= shard_bytes(hf, rank["rank"], 4) + 64 * 1024               # half a file
    finally:
        split.shutdown()
