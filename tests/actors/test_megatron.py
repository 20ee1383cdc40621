"""Megatron-LM GPT checkpoints (written from an HF GPT-2 by tests/megatron_writer.py) loaded in-process:
every rank of TP 1, 2, 4 from MP 1, 2, 4 in each QKV ordering equals that rank loaded from HF; a rank
reads only its slices; broken files fail with errors naming file and tensor."""
import argparse
import os

import pytest
import torch

import rayspeed
from actors.descriptions import resolve_description
from actors.loader import CheckpointError
from actors.megatron import megatron_name, qkv_heads
from actors.sharded_checkpoint import open_any
from tests.actors.test_reshard import assert_same, from_hf, rank_model
from tests.helpers import tiny_model
from tests.megatron_writer import order_qkv, write_megatron

ENGINE = dict(dtype=torch.float32, replace_with_kernel_inject=True)


class Opaque:
    """Pickled into a Megatron file: loading it would need this code."""


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2")


@pytest.fixture(scope="module")
def written(gpt2, tmp_path_factory):
    """{(mp, version): description dict}; version 0 in the older `transformer.`/`attention.` names."""
    out = {}
    for mp in (1, 2, 4):
        for version in (0, 1, 3.0):
            root = str(tmp_path_factory.mktemp(f"megatron-mp{mp}-v{version}"))
            files = write_megatron(gpt2, root, mp, version, old_names=version == 0)
            gpt2.config.to_json_file(os.path.join(root, "config.json"))
            out[mp, version] = {"type": "Megatron", "version": 0.0, "checkpoints": files, "base_dir": root}
    return out


@pytest.mark.parametrize("version", [0, 1, 3.0])
@pytest.mark.parametrize("mp", [1, 2, 4])
def test_every_rank_at_every_tp_equals_hf(gpt2, written, mp, version):
    for tp_size in (1, 2, 4):
        for rank in range(tp_size):
            ck = open_any(written[mp, version], None, rank, tp_size)
            assert_same(rank_model(gpt2.config, rank, tp_size, ck.policy(), ck.tensors()), from_hf(gpt2, rank, tp_size))


def test_qkv_orderings_are_views_of_one_layout():
    q, k, v = (torch.randn(2 * 4, 3) for _ in range(3))                  # 2 local heads of 4 rows
    for version in (0, 1, 2, 3):
        fused = order_qkv(q, k, v, 2, version)
        heads = qkv_heads(fused, 2, 4, version)
        assert torch.equal(torch.cat(heads), torch.cat([q, k, v])), version
        assert all(h.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() for h in heads)  # views


def test_a_rank_reads_only_its_slices(gpt2, written):
    sizes = sum(os.path.getsize(os.path.join(written[4, 3.0]["base_dir"], f)) for f in written[4, 3.0]["checkpoints"])
    for mp in (1, 4):
        ck = open_any(written[mp, 3.0], None, 1, 2)
        rank_model(gpt2.config, 1, 2, ck.policy(), ck.tensors())
        shard = sum(p.numel() * 4 for p in from_hf(gpt2, 1, 2).parameters())
        assert shard <= ck.bytes_read <= shard + 64 * 1024, mp                # its shard (+ padding rows)
        assert ck.bytes_read < 0.75 * sizes


def test_init_inference_model_config_wins_and_logits_match(gpt2, written, tmp_path):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = gpt2(ids).logits
    description = copy_of(written, tmp_path)
    wrong = tiny_model("gpt2").config
    wrong.n_layer = 5
    wrong.to_json_file(tmp_path / "config.json")                    # disagrees with the files
    with pytest.raises(CheckpointError, match=r"mp_rank_00/model_optim_rng.pt: tensor 'language_model.encoder.layers.3."
                                              r"input_layernorm.weight' \(replicated, for layers.3.attn_norm.weight\) "
                                              "missing"):
        rayspeed.init_inference(checkpoint=description, **ENGINE)
    with torch.device("meta"):
        meta_model = type(gpt2)(gpt2.config)
    for model in (gpt2.config, meta_model):                         # the model argument wins
        engine = rayspeed.init_inference(model, checkpoint=description, **ENGINE)
        got = engine.module(ids).logits
        assert ((got - expected).abs().max() / expected.abs().max()) < 1e-4
    description = dict(written[2, 3.0])
    root = description.pop("base_dir")
    engine = rayspeed.init_inference(checkpoint=description, base_dir=root, **ENGINE)   # config.json in base_dir
    greedy = dict(max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(engine.module.generate(ids, **greedy), gpt2.generate(ids, **greedy))


def test_config_from_megatron_args(gpt2, written, tmp_path):
    description = dict(written[4, 1], base_dir=str(tmp_path))
    for f in description["checkpoints"]:
        os.makedirs(tmp_path / os.path.dirname(f), exist_ok=True)
        os.link(os.path.join(written[4, 1]["base_dir"], f), tmp_path / f)
    engine = rayspeed.init_inference(checkpoint=description, **ENGINE)                   # no config.json anywhere
    config = engine.module.config
    assert (config.n_layer, config.n_embd, config.vocab_size, config.activation_function) == (3, 64, 512, "gelu_new")
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        expected = gpt2(ids).logits
    got = engine.module(ids).logits
    assert got.shape[-1] == 512 and torch.allclose(got[..., :320], expected, atol=1e-4)


def test_untied_output_layer_and_saving_as_presharded(tmp_path):
    """An untied LM head is vocab-parallel like the embeddings; a Megatron load can be saved with
    save_mp_checkpoint_path and that loads at another TP."""
    hf = tiny_model("gpt2")
    hf.config.tie_word_embeddings = False
    untied = type(hf)(hf.config).eval()
    untied.load_state_dict(hf.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(torch.randn_like(untied.lm_head.weight) * 0.1)
    files = write_megatron(untied, str(tmp_path / "megatron"), 2)
    description = {"type": "Megatron", "checkpoints": files, "base_dir": str(tmp_path / "megatron")}
    for rank in range(2):
        ck = open_any(resolve_description(description, model=untied.config, tp_size=2), None, rank, 2)
        assert_same(rank_model(untied.config, rank, 2, ck.policy(), ck.tensors()), from_hf(untied, rank, 2))
    rayspeed.init_inference(untied, checkpoint=description, save_mp_checkpoint_path=str(tmp_path / "ds"), **ENGINE)
    for rank in range(2):
        ck = open_any(str(tmp_path / "ds" / "ds_inference_config.json"), None, rank, 2)
        assert_same(rank_model(untied.config, rank, 2, ck.policy(), ck.tensors()), from_hf(untied, rank, 2))


# -- failures -----------------------------------------------------------------------------------

def copy_of(written, tmp_path, mp=2, version=3.0) -> dict:
    description = dict(written[mp, version], base_dir=str(tmp_path))
    for f in description["checkpoints"] + ["config.json"]:
        os.makedirs(tmp_path / os.path.dirname(f), exist_ok=True)
        (tmp_path / f).write_bytes(open(os.path.join(written[mp, version]["base_dir"], f), "rb").read())
    return description


def load_all(description, rank=0, tp_size=1):
    ck = open_any(description, None, rank, tp_size)
    rank_model(ck.hf_config(), rank, tp_size, ck.policy(), ck.tensors())


def edit(path, change) -> None:
    state = torch.load(path, weights_only=False)
    change(state["model"]["language_model"]["encoder"])
    torch.save(state, path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_corrupt_file(written, tmp_path, damage):
    description = copy_of(written, tmp_path)
    path = tmp_path / "mp_rank_01/model_optim_rng.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match=r"mp_rank_01/model_optim_rng.pt: torch.load\(weights_only=True\) "
                                              r"failed \(truncated or corrupt\?\)"):
        load_all(description)


def test_missing_tensor(written, tmp_path):
    description = copy_of(written, tmp_path)
    edit(tmp_path / "mp_rank_01/model_optim_rng.pt", lambda enc: enc.pop("layers.2.mlp.dense_4h_to_h.weight"))
    with pytest.raises(CheckpointError, match=r"mp_rank_01/model_optim_rng.pt: tensor 'language_model.encoder."
                                              r"layers.2.mlp.dense_4h_to_h.weight' \(shard 1 of 2, for "
                                              r"layers.2.mlp.down.weight\) missing"):
        load_all(description)


def test_shape_mismatch(written, tmp_path):
    description = copy_of(written, tmp_path)
    name = "layers.0.self_attention.query_key_value.weight"
    edit(tmp_path / "mp_rank_00/model_optim_rng.pt", lambda enc: enc.update({name: enc[name][:, :32].clone()}))
    with pytest.raises(CheckpointError, match=rf"mp_rank_00/model_optim_rng.pt: tensor 'language_model.encoder.{name}'"
                                              r" \(shard 0 of 2, for layers.0.attn.qkv.weight\): expected shape "
                                              r"\(96, 64\), found \(96, 32\)"):
        load_all(description)


def test_list_length_against_the_declared_degree(written, tmp_path):
    description = copy_of(written, tmp_path)
    with pytest.raises(CheckpointError, match=r"declares tensor-parallel degree 4 but lists 2 file\(s\) "
                                              r"\(one per rank"):
        open_any({**description, "mp_size": 4}, None, 0, 1)
    with pytest.raises(CheckpointError, match=r"mp_rank_00/model_optim_rng.pt: args.tensor_model_parallel_size=2, "
                                              r"but the description lists 1 file"):
        load_all({**description, "checkpoints": description["checkpoints"][:1]})


def test_tp_size_not_dividing_the_heads(written, tmp_path):
    description = copy_of(written, tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint description \(dict\): tp_size 3: tp_size=3 does not "
                                              r"divide num_heads=4"):
        rayspeed.init_inference(checkpoint=description, tensor_parallel={"tp_size": 3}, **ENGINE)
    edit_args = torch.load(tmp_path / "mp_rank_00/model_optim_rng.pt", weights_only=False)
    assert edit_args["args"].num_attention_heads == 4
    three = {**description, "checkpoints": description["checkpoints"] * 3, "mp_size": 6}
    with pytest.raises(CheckpointError, match="the checkpoint's tensor-parallel degree 6: tp_size=6 does not divide"):
        open_any(three, None, 0, 1)


def test_pickled_code_is_refused(written, tmp_path):
    description = copy_of(written, tmp_path)
    path = tmp_path / "mp_rank_00/model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["payload"] = Opaque()
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"mp_rank_00/model_optim_rng.pt: refused by torch.load\(weights_only="
                                              r"True\): it needs pickled code \(tests.actors.test_megatron.Opaque\)"):
        load_all(description)


def test_args_namespace_is_the_one_class_allowed(written):
    assert megatron_name("layers.3.attn.qkv.bias") == \
        "language_model.encoder.layers.3.self_attention.query_key_value.bias"
    state = torch.load(os.path.join(written[1, 3.0]["base_dir"], written[1, 3.0]["checkpoints"][0]), weights_only=False)
    assert isinstance(state["args"], argparse.Namespace) and state["checkpoint_version"] == 3.0
