"""Merge/split across TP degrees, in-process: every rank of a checkpoint saved at M loaded at T
equals that rank loaded from the HF weights; each rank opens only the files holding its slice;
the lazy views behave like the tensors they stand for."""
import json

import pytest
import torch

from actors.loader import CheckpointError, load_weights
from actors.reshard import held, layouts, shard_sources
from actors.sharded_checkpoint import open_any, save_shards
from actors.tensor_views import ConcatTensor, DeferredTensor, MappedTensor
from kernels.linear import TensorParallel
from kernels.model import CausalLM
from policies.registry import policy_for
from tests.helpers import tiny_model


def rank_model(hf_config, rank: int, tp_size: int, policy, tensors) -> CausalLM:
    model = CausalLM(policy_for(hf_config).spec(hf_config), torch.float32, TensorParallel(rank, tp_size))
    load_weights(model, policy, tensors, progress=False)
    return model


def from_hf(hf, rank: int, tp_size: int) -> CausalLM:
    return rank_model(hf.config, rank, tp_size, policy_for(hf.config), hf.state_dict().items())


def assert_same(got: CausalLM, want: CausalLM) -> None:
    want_state = want.state_dict()
    for name, tensor in got.state_dict().items():
        assert torch.equal(tensor, want_state[name]), name


def save_presharded(hf, root: str, saved: int) -> str:
    """What `save_mp_checkpoint_path` writes from a TP group of `saved` ranks (ranks built in-process)."""
    for rank in range(saved):
        save_shards(from_hf(hf, rank, saved), root, None, hf.config, hf.generation_config)
    return f"{root}/ds_inference_config.json"


def load_rank(description, rank: int, tp_size: int, hf_config):
    ck = open_any(description, None, rank, tp_size)
    return ck, rank_model(hf_config, rank, tp_size, ck.policy(), ck.tensors())


# gpt2: plain heads; llama: 2 KV heads (replicated at 4) and a merged gate/up; mistral: 1 KV head
@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral"])
@pytest.mark.parametrize("saved, tp_size", [(2, 2), (2, 1), (2, 4), (4, 2), (4, 1), (1, 4)])
def test_presharded_loads_at_any_tp(family, saved, tp_size, tmp_path):
    hf = tiny_model(family)
    description = save_presharded(hf, str(tmp_path), saved)
    for rank in range(tp_size):
        ck, got = load_rank(description, rank, tp_size, hf.config)
        assert_same(got, from_hf(hf, rank, tp_size))
        opened = {url.rsplit("/", 1)[1] for url in ck.files._flat}
        wanted = {f"tp_{s:02d}.safetensors" for s in shard_sources(rank, tp_size, saved)}
        assert opened == wanted | {"non_tp.safetensors"}, (rank, opened)


def test_bytes_read_are_this_ranks_share(tmp_path):
    hf = tiny_model("llama")
    description = save_presharded(hf, str(tmp_path), 4)
    sizes = {p.name: p.stat().st_size for p in tmp_path.glob("*.safetensors")}
    for tp_size in (1, 2, 4):
        ck, _ = load_rank(description, 0, tp_size, hf.config)
        own = sum(sizes[f"tp_{s:02d}.safetensors"] for s in range(4 // tp_size))
        assert own < ck.bytes_read <= own + sizes["non_tp.safetensors"] + 64 * 1024, tp_size


def test_a_tp_list_of_injected_shards_in_chunks(tmp_path):
    """ds_model, parallelization 'tp', no non_tp files: k * M files, file i * M + s = chunk i of shard s,
    replicated tensors in every shard's files."""
    hf = tiny_model("llama")
    files = []
    for rank in range(2):
        state = from_hf(hf, rank, 2).state_dict()
        names = sorted(state)
        for chunk, part in enumerate((names[::2], names[1::2])):
            torch.save({n: state[n].clone() for n in part}, tmp_path / f"c{chunk}_r{rank}.pt")
    files = [f"c{chunk}_r{rank}.pt" for chunk in range(2) for rank in range(2)]
    hf.config.to_json_file(tmp_path / "config.json")
    description = {"type": "ds_model", "version": 0.0, "parallelization": "tp", "tp_size": 2, "checkpoints": files,
                   "base_dir": str(tmp_path)}
    for tp_size in (1, 4):
        for rank in range(tp_size):
            ck, got = load_rank(description, rank, tp_size, hf.config)
            assert_same(got, from_hf(hf, rank, tp_size))
            assert ck.bytes_read > 0


def test_description_with_a_tp_list_not_a_multiple_of_its_degree(tmp_path):
    hf = tiny_model("gpt2")
    description = save_presharded(hf, str(tmp_path), 2)
    saved = json.loads((tmp_path / "ds_inference_config.json").read_text())
    saved["tp_size"] = 4
    (tmp_path / "ds_inference_config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=r"ds_inference_config.json: declares tensor-parallel degree 4 but "
                                              r"lists 2 file\(s\)"):
        open_any(description, None, 0, 1)


def test_missing_and_misshapen_shards_name_file_and_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    hf = tiny_model("gpt2")
    description = save_presharded(hf, str(tmp_path), 2)
    shard = load_file(tmp_path / "tp_01.safetensors")
    name = "layers.1.mlp.up.weight"
    save_file({**shard, name: shard[name][:-1]}, tmp_path / "tp_01.safetensors")
    with pytest.raises(CheckpointError, match=rf"tp_01.safetensors: tensor '{name}' \(shard 1 of 2\): "
                                              r"expected shape \(128, 64\), found \(127, 64\)"):
        load_rank(description, 0, 1, hf.config)
    del shard[name]
    save_file(shard, tmp_path / "tp_01.safetensors")
    with pytest.raises(CheckpointError, match=rf"tp_01.safetensors: tensor '{name}' \(shard 1 of 2\) missing"):
        load_rank(description, 0, 1, hf.config)
    ck, _ = load_rank(description, 0, 2, hf.config)          # rank 0 at TP 2 never opens tp_01
    assert "tp_01" not in " ".join(ck.files._flat)


# -- building blocks ----------------------------------------------------------------------------

def test_held_and_sources():
    assert [held(s, 4, 8) for s in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert [held(s, 4, 2) for s in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [shard_sources(r, 2, 4) for r in range(2)] == [range(0, 2), range(2, 4)]
    assert [shard_sources(r, 4, 2) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [shard_sources(r, 2, 3) for r in range(2)] == [range(0, 2), range(1, 3)]
    with pytest.raises(CheckpointError, match="do not split evenly into 3 shards"):
        held(0, 3, 4)


def test_layouts_name_every_parameter_with_its_split():
    hf = tiny_model("llama")
    lay = layouts(policy_for(hf.config).spec(hf.config))
    qkv, gate_up, down = lay["layers.0.attn.qkv.weight"], lay["layers.0.mlp.up.weight"], lay["layers.0.mlp.down.weight"]
    assert qkv.dim == 0 and [(p.units, p.unit_size) for p in qkv.parts] == [(4, 16), (2, 16), (2, 16)]
    assert gate_up.dim == 0 and [p.units for p in gate_up.parts] == [128, 128]
    assert down.dim == 1 and lay["embed.weight"].dim is None
    assert qkv.shard_shape(3, 4) == (16 + 2 * 16, 64)


def test_views_narrow_split_transpose_like_tensors():
    full = torch.arange(8 * 6, dtype=torch.float32).view(8, 6)
    counter = type("Counter", (), {"bytes_read": 0})()
    parts = [MappedTensor(full[:3], counter), MappedTensor(full[3:5], counter),
             DeferredTensor((3, 6), lambda: MappedTensor(full[5:], counter))]
    view = ConcatTensor(parts, 0)
    assert view.shape == full.shape and view.dtype == full.dtype
    assert torch.equal(view.materialize(), full)
    for dim in (0, 1):
        for start, length in ((0, 2), (2, 4), (1, 5)):
            assert torch.equal(view.narrow(dim, start, length).materialize(), full.narrow(dim, start, length))
    assert torch.equal(view.t().narrow(0, 1, 2).narrow(1, 2, 4).materialize(), full.t()[1:3, 2:6])
    assert [p.shape for p in view.split([3, 5])] == [torch.Size([3, 6]), torch.Size([5, 6])]
    before = counter.bytes_read
    assert isinstance(view.narrow(0, 3, 2), MappedTensor)           # one part: no concatenation
    view.narrow(0, 6, 2).materialize()                               # only the deferred part is fetched
    assert counter.bytes_read - before == 2 * 6 * 4
    with pytest.raises(ValueError, match="outside"):
        view.narrow(0, 6, 3)
