"""Tensor-parallel slicing without a process group: ranks 0 and 1 of 2 each load their shard through
the policy, and their shards put back together equal the TP=1 parameters, for every family.

Fused layers hold one slice of every part per rank ([q_r; k_r; v_r], [gate_r; up_r]), so they are
put back together part by part; KV heads replicated over ranks (fewer KV heads than ranks) count once.
"""
import pytest
import torch

from actors.checkpoint import open_checkpoint, save_checkpoint
from actors.lazy_tensor import LazyTensor
from actors.loader import load_weights
from kernels.linear import MergedColumnParallelLinear, QKVParallelLinear, TensorParallel
from kernels.model import CausalLM
from policies.registry import policy_for
from tests.helpers import CONFIGS, tiny_model


def load_rank(hf, tp: TensorParallel) -> CausalLM:
    policy = policy_for(hf.config)
    model = CausalLM(policy.spec(hf.config), torch.float32, tp)
    load_weights(model, policy, hf.state_dict().items(), progress=False)
    return model


def merge_parts(shards: list[torch.Tensor], sizes: list[int], replicas: list[int]) -> torch.Tensor:
    """Rank r's shard is its slices of every part side by side (`sizes` rows each); part i is held
    whole by every `replicas[i]`-th rank, the ranks between holding copies."""
    per_rank = [shard.split(sizes) for shard in shards]
    merged = []
    for i, step in enumerate(replicas):
        slices = [parts[i] for parts in per_rank]
        for r, piece in enumerate(slices):
            assert torch.equal(piece, slices[r - r % step]), f"part {i}: rank {r} differs from its replica"
        merged.append(torch.cat(slices[::step]))
    return torch.cat(merged)


def unshard(module: torch.nn.Module, shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    if dim == 0 and isinstance(module, QKVParallelLinear):
        return merge_parts(shards, module.sizes, [1, module.kv_replicas, module.kv_replicas])
    if dim == 0 and isinstance(module, MergedColumnParallelLinear):
        return merge_parts(shards, module.part_sizes, [1] * len(module.part_sizes))
    return torch.cat(shards, dim)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_rank_shards_put_together_equal_the_tp1_parameters(family):
    hf = tiny_model(family)
    whole = load_rank(hf, TensorParallel(0, 1))
    ranks = [load_rank(hf, TensorParallel(rank, 2)) for rank in range(2)]
    rank_params = [dict(model.named_parameters()) for model in ranks]
    sharded = 0
    for name, want in whole.named_parameters():
        shards = [params[name] for params in rank_params]
        dim = getattr(shards[0], "tp_dim", None)
        if dim is None:                                      # replicated: every rank holds all of it
            assert all(torch.equal(shard, want) for shard in shards), name
            continue
        module = ranks[0].get_submodule(name.rpartition(".")[0])
        assert torch.equal(unshard(module, shards, dim), want), name
        sharded += 1
    assert sharded >= 4 * whole.spec.num_layers              # qkv, out, up, down weights at least


@pytest.mark.parametrize("family", ["bloom", "gpt_neox", "gptj", "opt_post", "phi"])
def test_rank_shard_from_lazy_checkpoint_tensors_equals_one_from_memory(family, tmp_path):
    """Through a safetensors checkpoint the loaders get `LazyTensor`s; per-head fused QKV (BLOOM,
    NeoX) is regrouped from the whole tensor read at once, the rest read as slices."""
    hf = tiny_model(family)
    ck = open_checkpoint(save_checkpoint(hf, str(tmp_path)))
    assert all(isinstance(tensor, LazyTensor) for _, tensor in ck.tensors())
    policy, tp = policy_for(hf.config), TensorParallel(1, 2)
    from_file = CausalLM(policy.spec(hf.config), torch.float32, tp)
    load_weights(from_file, policy, ck.tensors(), progress=False)
    from_memory = load_rank(hf, tp)
    for (name, got), want in zip(from_file.state_dict().items(), from_memory.state_dict().values()):
        assert torch.equal(got, want), name
