"""Checkpoints through fsspec: round trips (local, memory://, s3:// on moto), sharded and `.bin`
weights, lazy slices that read only their bytes, and errors that name the file."""
import json
import os

import fsspec
import pytest
import safetensors.torch
import torch
from fsspec.implementations.memory import MemoryFileSystem

from actors import lazy_tensor
from actors.checkpoint import DTYPES, open_checkpoint, save_checkpoint
from actors.lazy_tensor import LazyTensor
from actors.loader import CheckpointError, load_weights
from tests.helpers import PAD, byte_tokenizer, tiny_model
from kernels.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, TensorParallel
from kernels.model import CausalLM
from policies.registry import policy_for


class CountingMemoryFileSystem(MemoryFileSystem):
    """An in-memory filesystem of its own that counts the bytes every read returns."""
    protocol = "countingmem"
    store: dict = {}
    pseudo_dirs = [""]
    bytes_returned = 0
    reads = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("countingmem://") if isinstance(path, str) else path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start, end, **kwargs)
        CountingMemoryFileSystem.bytes_returned += len(data)
        CountingMemoryFileSystem.reads += 1
        return data


fsspec.register_implementation("countingmem", CountingMemoryFileSystem, clobber=True)


class Opaque:
    """Pickled by a malicious `.bin`: loading it would need this code."""


@pytest.fixture(scope="module")
def models():
    return {family: tiny_model(family) for family in ("gpt2", "llama")}


def location(kind: str, tmp_path, request) -> tuple[str, dict | None]:
    name = request.node.name.replace("[", "-").replace("]", "")
    if kind == "local":
        return str(tmp_path / "ckpt"), None
    if kind == "memory":
        return f"memory://{name}", None
    return f"s3://ckpt-bucket/{name}", request.getfixturevalue("s3")


def assert_same_weights(ck, model) -> None:
    state = model.state_dict()
    loaded = {name: t.materialize() if isinstance(t, LazyTensor) else t for name, t in ck.tensors()}
    assert len(ck) == len(loaded)
    assert set(state) - set(loaded) <= {"lm_head.weight"}      # tied to the embedding, saved once
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[name]), name


# -- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
def test_round_trip(kind, family, models, tmp_path, request):
    model, tokenizer = models[family], byte_tokenizer()
    uri, options = location(kind, tmp_path, request)
    assert save_checkpoint(model, uri, tokenizer=tokenizer, storage_options=options) == uri
    ck = open_checkpoint(uri, options)
    assert_same_weights(ck, model)
    config = ck.hf_config()
    assert config.model_type == model.config.model_type
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert getattr(config, key) == getattr(model.config, key)
    assert ck.generation_config().pad_token_id == PAD
    assert ck.tokenizer()("héllo")["input_ids"] == tokenizer("héllo")["input_ids"]
    weight_bytes = sum(t.nbytes for t in model.state_dict().values())
    assert weight_bytes * 0.5 < ck.bytes_read < weight_bytes * 1.2


def test_file_uri_and_no_tokenizer_or_generation_config(models, tmp_path):
    save_checkpoint(models["llama"], str(tmp_path))
    os.remove(tmp_path / "generation_config.json")
    ck = open_checkpoint(f"file://{tmp_path}")
    assert ck.tokenizer() is None
    assert ck.generation_config().eos_token_id == models["llama"].config.eos_token_id
    assert_same_weights(ck, models["llama"])


def test_sharded_safetensors(models):
    uri = "memory://sharded"
    save_checkpoint(models["gpt2"], uri, max_shard_size="20KB")
    fs = fsspec.filesystem("memory")
    assert fs.exists(f"{uri}/model.safetensors.index.json")
    assert len(fs.glob(f"{uri}/model-*.safetensors")) > 2
    assert_same_weights(open_checkpoint(uri), models["gpt2"])


@pytest.mark.parametrize("where", ["local", "memory"])
def test_bin_single_and_sharded(models, tmp_path, where):
    state = models["llama"].state_dict()
    names = sorted(state)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    for d in (single, sharded):
        d.mkdir()
        models["llama"].config.to_json_file(d / "config.json")
    torch.save(state, single / "pytorch_model.bin")
    halves = {"pytorch_model-1.bin": names[::2], "pytorch_model-2.bin": names[1::2]}
    for file, part in halves.items():
        torch.save({n: state[n] for n in part}, sharded / file)
    weight_map = {n: file for file, part in halves.items() for n in part}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for d in (single, sharded):
        uri = str(d)
        if where == "memory":
            uri = f"memory://bin-{d.name}"
            fsspec.filesystem("memory").put(f"{d}/", uri, recursive=True)
        ck = open_checkpoint(uri)
        assert_same_weights(ck, models["llama"])
        assert all(isinstance(t, torch.Tensor) for _, t in ck.tensors())


# -- lazy slices --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def counted(models):
    """The llama model saved on the counting filesystem."""
    save_checkpoint(models["llama"], "countingmem://llama")
    save_checkpoint(models["gpt2"], "countingmem://gpt2")
    return models


def header_bytes(uri: str) -> int:
    return 8 + int.from_bytes(fsspec.filesystem("countingmem").cat_file(f"{uri}/model.safetensors", 0, 8), "little")


@pytest.mark.parametrize("dim", [0, 1])
def test_half_slice_reads_only_its_bytes(counted, dim):
    name = "model.layers.0.mlp.down_proj.weight"                  # [hidden 64, intermediate 128] f32
    full = counted["llama"].state_dict()[name]
    start = CountingMemoryFileSystem.bytes_returned
    ck = open_checkpoint("countingmem://llama")
    lazy = dict(ck.tensors())[name]
    half = lazy.narrow(dim, full.shape[dim] // 2, full.shape[dim] // 2)
    assert torch.equal(half.materialize(), full.narrow(dim, full.shape[dim] // 2, full.shape[dim] // 2))
    half_bytes = full.nbytes // 2
    fs_read, header = CountingMemoryFileSystem.bytes_returned - start, header_bytes("countingmem://llama")
    assert ck.bytes_read == fs_read
    assert fs_read <= 1.1 * half_bytes + header
    print(f"dim {dim}: read {fs_read - header} data bytes for a {half_bytes}-byte half "
          f"(ratio {(fs_read - header) / half_bytes:.3f}), header {header}")


def test_weight_loaders_take_lazy_tensors(counted):
    """Rank 1 of 2 loads its shards from lazy tensors, reading about half of each weight."""
    state, tp = counted["llama"].state_dict(), TensorParallel(rank=1, size=2)
    ck = open_checkpoint("countingmem://llama")
    lazy = dict(ck.tensors())
    before = ck.bytes_read
    down = RowParallelLinear(128, 64, bias=False, tp=tp, dtype=torch.float32)
    down.weight_loader(down.weight, lazy["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(down.weight, state["model.layers.0.mlp.down_proj.weight"][:, 64:])
    up = ColumnParallelLinear(64, 128, bias=False, tp=tp, dtype=torch.float32)
    up.weight_loader(up.weight, lazy["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(up.weight, state["model.layers.0.mlp.up_proj.weight"][64:])
    assert ck.bytes_read - before == (down.weight.nbytes + up.weight.nbytes)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tp_rank_loads_its_shard_from_a_checkpoint(counted, family):
    """A rank of 2 loaded through the policy equals one loaded from the in-memory state dict,
    and reads well under the whole checkpoint (embeddings and norms are replicated)."""
    ck = open_checkpoint(f"countingmem://{family}")
    config, tp = ck.hf_config(), TensorParallel(rank=1, size=2)
    policy = policy_for(config)
    from_checkpoint, from_state = (CausalLM(policy.spec(config), torch.float32, tp) for _ in range(2))
    load_weights(from_checkpoint, policy, ck.tensors(), total=len(ck), progress=False)
    load_weights(from_state, policy, counted[family].state_dict().items(), progress=False)
    for (name, got), want in zip(from_checkpoint.state_dict().items(), from_state.state_dict().values()):
        assert torch.equal(got, want), name
    assert ck.bytes_read < 0.75 * sum(t.nbytes for t in counted[family].state_dict().values())


def test_transpose_and_split_of_a_fused_tensor(counted):
    """GPT-2's Conv1D c_attn is [in, 3*out]: transpose, split into q, k, v, keep rank 1's heads."""
    full = counted["gpt2"].state_dict()["transformer.h.0.attn.c_attn.weight"]     # [64, 192]
    ck = open_checkpoint("countingmem://gpt2")
    lazy = dict(ck.tensors())["transformer.h.0.attn.c_attn.weight"]
    assert lazy.t().shape == full.t().shape and lazy.dim() == 2 and lazy.dtype == full.dtype
    assert torch.equal(lazy.t().narrow(1, 10, 20).materialize(), full.t().narrow(1, 10, 20))
    assert torch.equal(lazy.t().narrow(0, -64, 64).materialize(), full.t().narrow(0, -64, 64))
    for part, ref in zip(lazy.t().split([64, 64, 64]), full.t().split([64, 64, 64])):
        assert torch.equal(part.narrow(0, 32, 32).materialize(), ref.narrow(0, 32, 32))
    assert [p.shape for p in lazy.split(24, dim=1)] == [p.shape for p in full.split(24, dim=1)]
    qkv = QKVParallelLinear(64, 16, 4, 4, bias=False, tp=TensorParallel(rank=1, size=2), dtype=torch.float32)
    reference = QKVParallelLinear(64, 16, 4, 4, bias=False, tp=TensorParallel(rank=1, size=2), dtype=torch.float32)
    qkv.weight_loader(qkv.weight, lazy.t())
    reference.weight_loader(reference.weight, full.t())
    assert torch.equal(qkv.weight, reference.weight)


@pytest.mark.parametrize("where", ["memory", "local"])
def test_every_dtype_and_3d_narrows(where, tmp_path):
    """One [4, 3, 5] tensor per safetensors dtype torch has; any narrow equals torch's, and a
    dim-0 narrow reads only its rows. A local file is read through a memory map (one strided copy
    a view), any other filesystem by byte ranges."""
    g = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(4, 3, 5, generator=g) * 50).to(dtype) for name, dtype in DTYPES.items()}
    tensors["scalar"], tensors["vector"] = torch.tensor(3.5), torch.arange(10, dtype=torch.int32)
    if where == "local":
        safetensors.torch.save_file(tensors, str(tmp_path / "model.safetensors"))
        uri = str(tmp_path)
    else:
        fsspec.filesystem("countingmem").pipe("countingmem://dtypes/model.safetensors", safetensors.torch.save(tensors))
        uri = "countingmem://dtypes"
    ck = open_checkpoint(uri)
    lazy = dict(ck.tensors())
    assert len(ck) == len(tensors)
    for name, full in tensors.items():
        assert lazy[name].dtype == full.dtype and torch.equal(lazy[name].materialize(), full), name
    assert torch.equal(lazy["vector"].narrow(0, 2, 5).materialize(), tensors["vector"][2:7])
    for name in DTYPES:
        for dim in range(3):
            other = (dim + 1) % 3
            got = lazy[name].narrow(dim, 1, 2).narrow(other, 1, 2).materialize()
            assert torch.equal(got, tensors[name].narrow(dim, 1, 2).narrow(other, 1, 2)), (name, dim)
    before = ck.bytes_read
    lazy["F64"].narrow(0, 1, 2).materialize()
    assert ck.bytes_read - before == 2 * 3 * 5 * 8
    before = ck.bytes_read
    column = lazy["F32"].narrow(2, 1, 3).materialize()               # a row-parallel-like shard
    assert torch.equal(column, tensors["F32"][:, :, 1:4]) and column.is_contiguous()
    assert ck.bytes_read - before == 4 * 3 * 3 * 4
    with pytest.raises(ValueError):
        lazy["F32"].t()


@pytest.mark.parametrize("block_kb", [16384, 20])
def test_a_remote_row_parallel_shard_is_read_in_spanning_blocks(block_kb, monkeypatch):
    """Past REMOTE_EXACT_RUNS runs (here 300 rows of a column half, and a [6, 50, 40] tensor's middle
    narrow) a remote view is read as blocks from a run's start to a later run's end, at most
    REMOTE_BLOCK_BYTES each: one read per block instead of one per row, the same values, and the
    bytes fetched are the blocks' (the rows' other halves included)."""
    monkeypatch.setattr(lazy_tensor, "REMOTE_BLOCK_BYTES", block_kb * 1024)
    g = torch.Generator().manual_seed(1)
    tensors = {"w": torch.randn(300, 64, generator=g), "cube": torch.randn(6, 50, 40, generator=g).half()}
    fsspec.filesystem("countingmem").pipe("countingmem://spans/model.safetensors", safetensors.torch.save(tensors))
    lazy = dict(open_checkpoint("countingmem://spans").tensors())
    reads, fetched = CountingMemoryFileSystem.reads, CountingMemoryFileSystem.bytes_returned
    requests = lazy["w"].reader.requests
    half = lazy["w"].narrow(1, 32, 32).materialize()
    assert torch.equal(half, tensors["w"][:, 32:]) and half.is_contiguous()
    span = 299 * 64 * 4 + 32 * 4                                      # first run's start to last run's end
    blocks = -(-span // (block_kb * 1024 - 32 * 4)) if block_kb * 1024 < span else 1
    assert CountingMemoryFileSystem.reads - reads == blocks == lazy["w"].reader.requests - requests
    gaps = (blocks - 1) * 32 * 4                                      # between blocks: not fetched
    assert CountingMemoryFileSystem.bytes_returned - fetched == span - gaps
    assert torch.equal(lazy["cube"].narrow(1, 10, 30).narrow(2, 5, 20).materialize(), tensors["cube"][:, 10:40, 5:25])
    monkeypatch.setattr(lazy_tensor, "REMOTE_EXACT_RUNS", 10_000)       # below the threshold: run by run, exact
    reads, fetched = CountingMemoryFileSystem.reads, CountingMemoryFileSystem.bytes_returned
    assert torch.equal(lazy["w"].narrow(1, 32, 32).materialize(), tensors["w"][:, 32:])
    assert (CountingMemoryFileSystem.reads - reads, CountingMemoryFileSystem.bytes_returned - fetched) == (300, 300 * 32 * 4)


def test_a_local_file_cut_short_after_opening_names_it(tmp_path):
    """The header is read when the checkpoint opens; a file truncated after that is named on the read."""
    safetensors.torch.save_file({"a": torch.ones(64, 64)}, str(tmp_path / "model.safetensors"))
    ck = open_checkpoint(str(tmp_path))
    lazy = dict(ck.tensors())["a"]
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        lazy.narrow(1, 0, 32).materialize()


# -- errors -------------------------------------------------------------------------------------

def write_dir(tmp_path, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return str(tmp_path)


def load_all(uri: str) -> None:
    ck = open_checkpoint(uri)
    for _, tensor in ck.tensors():
        tensor.materialize() if isinstance(tensor, LazyTensor) else tensor


def safetensors_bytes() -> bytes:
    return safetensors.torch.save({"a": torch.ones(16, 16), "b": torch.zeros(8)})


@pytest.mark.parametrize("case, files, message", [
    ("truncated", {"model.safetensors": safetensors_bytes()[:-100]}, "outside the file"),
    ("garbage header", {"model.safetensors": (40).to_bytes(8, "little") + b"\xff" * 40 + b"\0" * 64}, "JSON"),
    ("header too long", {"model.safetensors": (10**6).to_bytes(8, "little") + b"{}"}, "header length"),
    ("tiny", {"model.safetensors": b"abc"}, "truncated"),
    ("bad index", {"model.safetensors.index.json": b'{"weight_map": {"a": "model-1.safetensors"}}'},
     "not found"),
])
def test_bad_safetensors_name_the_file(tmp_path, case, files, message):
    uri = write_dir(tmp_path, files)
    with pytest.raises(CheckpointError, match=message) as info:
        load_all(uri)
    assert "model" in str(info.value) and str(tmp_path) in str(info.value)


def test_missing_weights_list_what_was_found(tmp_path):
    uri = write_dir(tmp_path, {"config.json": b"{}", "notes.txt": b"hi"})
    with pytest.raises(CheckpointError, match="no weights.*config.json, notes.txt"):
        load_all(uri)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        open_checkpoint(str(tmp_path / "absent"))
    with pytest.raises(CheckpointError, match="config.json.*model_type"):
        open_checkpoint(uri).hf_config()


def test_bin_with_pickled_code_is_refused(tmp_path):
    torch.save({"w": torch.ones(2), "payload": Opaque()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*weights_only") as info:
        load_all(str(tmp_path))
    assert "Opaque" in str(info.value)


def test_corrupt_bin_names_the_file(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_all(str(tmp_path))
