"""Checkpoint descriptions: where relative paths point (base_dir, the json's directory, fsspec URLs),
which model config wins, BLOOM and ds_model file lists of whole tensors, and clear errors."""
import json

import fsspec
import pytest
import safetensors.torch
import torch

import rayspeed
from actors.descriptions import resolve_description
from actors.loader import CheckpointError
from actors.sharded_checkpoint import open_any
from tests.actors.test_reshard import assert_same, from_hf, rank_model
from tests.helpers import byte_tokenizer, tiny_model
from tests.megatron_writer import write_megatron

ENGINE = dict(dtype=torch.float32, replace_with_kernel_inject=True)


def logits_match(engine, hf) -> None:
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(ids).logits
    got = engine.module(ids).logits
    assert ((got - expected).abs().max() / expected.abs().max()) < 1e-4


def halves(state: dict) -> list[dict]:
    names = sorted(state)
    return [{n: state[n].clone() for n in names[::2]}, {n: state[n].clone() for n in names[1::2]}]


def test_bloom_description_whole_files_sliced_per_rank(tmp_path):
    """BLOOM's inference-script layout: HF-named files (here without the `transformer.` prefix,
    as bigscience/bloom ships them), each whole; every rank keeps its slices."""
    hf = tiny_model("bloom")
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    first, second = halves(state)
    torch.save(first, tmp_path / "pytorch_model_00001-of-00002.bin")
    safetensors.torch.save_file(second, tmp_path / "model_00002-of-00002.safetensors")
    hf.config.to_json_file(tmp_path / "config.json")
    byte_tokenizer().save_pretrained(tmp_path)
    files = ["pytorch_model_00001-of-00002.bin", "model_00002-of-00002.safetensors"]
    (tmp_path / "checkpoints.json").write_text(json.dumps({"type": "BLOOM", "checkpoints": files, "version": 1.0}))
    engine = rayspeed.init_inference(checkpoint=str(tmp_path / "checkpoints.json"), **ENGINE)
    logits_match(engine, hf)
    assert engine.generate("hi", max_new_tokens=2)[0].prompt == "hi"                 # tokenizer found
    for rank in range(2):
        ck = open_any(str(tmp_path / "checkpoints.json"), None, rank, 2)
        assert_same(rank_model(hf.config, rank, 2, ck.policy(), ck.tensors()), from_hf(hf, rank, 2))


@pytest.mark.parametrize("names", ["hf", "injected"])
def test_ds_model_list_of_whole_tensors(tmp_path, names):
    hf = tiny_model("llama")
    state = hf.state_dict() if names == "hf" else from_hf(hf, 0, 1).state_dict()
    for i, part in enumerate(halves(state)):
        torch.save(part, tmp_path / f"part{i}.pt")
    description = {"type": "ds_model", "version": 0.0, "checkpoints": ["part0.pt", "part1.pt"]}
    engine = rayspeed.init_inference(hf.config, checkpoint=description, base_dir=str(tmp_path), **ENGINE)
    logits_match(engine, hf)
    single = {"type": "ds_model", "checkpoints": "whole.pt"}                        # one file, as a string
    torch.save(state, tmp_path / "whole.pt")
    for rank in range(2):
        ck = open_any(resolve_description(single, str(tmp_path), None, hf.config, 2), None, rank, 2)
        assert_same(rank_model(hf.config, rank, 2, ck.policy(), ck.tensors()), from_hf(hf, rank, 2))


def test_paths_relative_to_the_json_or_base_dir_and_fsspec_urls(tmp_path):
    hf = tiny_model("gpt2")
    files = write_megatron(hf, str(tmp_path / "ckpt"), 2)
    (tmp_path / "ckpt" / "checkpoint.json").write_text(json.dumps({"type": "Megatron", "checkpoints": files}))
    hf.config.to_json_file(tmp_path / "ckpt" / "config.json")
    by_json = resolve_description(str(tmp_path / "ckpt" / "checkpoint.json"))
    assert by_json["files"] == [f"{tmp_path}/ckpt/{f}" for f in files]
    assert by_json["config_from"] == f"{tmp_path}/ckpt/config.json" and by_json["mp_size"] == 2
    (tmp_path / "elsewhere.json").write_text(json.dumps({"type": "Megatron", "checkpoints": files}))
    by_base = resolve_description(str(tmp_path / "elsewhere.json"), base_dir=str(tmp_path / "ckpt"))
    assert by_base["files"] == by_json["files"] and by_base["config_from"] == by_json["config_from"]
    absolute = resolve_description({"type": "Megatron", "checkpoints": by_json["files"]}, model=hf.config)
    assert absolute["files"] == by_json["files"] and absolute["config_from"] == "the model argument"
    fsspec.filesystem("memory").put(f"{tmp_path}/ckpt/", "memory://described/", recursive=True)
    engine = rayspeed.init_inference(checkpoint="memory://described/checkpoint.json", **ENGINE)
    logits_match(engine, hf)


@pytest.mark.parametrize("description, message", [
    ({"type": "Orca", "checkpoints": ["a.pt"]}, "type 'Orca': expected one of Megatron, ds_model, BLOOM"),
    ({"type": "Megatron", "checkpoints": []}, "'checkpoints' must list weight files, found \\[\\]"),
    ({"type": "ds_model", "parallelization": "tp", "tp_size": 2, "checkpoints": ["a.pt", "b.pt", "c.pt"]},
     "declares tensor-parallel degree 2 but lists 3 file"),
    ({"type": "BLOOM", "checkpoints": ["a.bin"]}, "no model config: pass it .* or put config.json in"),
])
def test_bad_descriptions(tmp_path, description, message):
    with pytest.raises(CheckpointError, match=message):
        resolve_description(description, str(tmp_path))


def test_missing_file_json_and_family(tmp_path):
    with pytest.raises(CheckpointError, match="absent.json: no such checkpoint description"):
        resolve_description(str(tmp_path / "absent.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="bad.json: not valid JSON"):
        resolve_description(str(tmp_path / "bad.json"))
    megatron = {"type": "Megatron", "checkpoints": ["mp_rank_00/model_optim_rng.pt"]}
    with pytest.raises(CheckpointError, match="Megatron GPT checkpoints load as GPT-2; .* model_type='llama'"):
        resolve_description(megatron, str(tmp_path), model=tiny_model("llama").config)
    hf = tiny_model("gpt2")
    hf.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"mp_rank_00/model_optim_rng.pt: listed by the checkpoint description, "
                                              "not found"):
        rayspeed.init_inference(checkpoint=megatron, base_dir=str(tmp_path), **ENGINE)
    with pytest.raises(rayspeed.ConfigError, match="replace_with_kernel_inject=True"):
        rayspeed.init_inference(hf, checkpoint=megatron, dtype=torch.float32)
