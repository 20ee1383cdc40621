"""Pre-sharded checkpoints: what `save_mp_checkpoint_path` writes, and its reader.

Layout (any fsspec URI), as DeepSpeed's `ds_inference_config.json` describes it:
    ds_inference_config.json   {"type": "ds_model", "version": 1.0, "parallelization": "tp",
                                "tp_size": N, "dtype": ..., "checkpoints": {"non_tp": [...], "tp": [...]}}
    non_tp.safetensors         replicated parameters (embeddings, norms, row-parallel biases)
    tp_00.safetensors ...      rank r's shard of every tensor-parallel parameter
    config.json, generation_config.json, tokenizer files
Names inside are the injected model's parameter names; each rank opens only non_tp and its own file.
"""
import json
import os
import tempfile

import fsspec
import torch
from safetensors.torch import save as safetensors_bytes

from actors.checkpoint import Checkpoint, open_checkpoint
from actors.loader import CheckpointError
from kernels.model import CausalLM

DESCRIPTION = "ds_inference_config.json"


def is_description(checkpoint) -> bool:
    return isinstance(checkpoint, dict) or (isinstance(checkpoint, str) and checkpoint.endswith(".json"))


class ShardedCheckpoint:
    """One rank's view of a pre-sharded checkpoint."""

    def __init__(self, uri: str, storage_options: dict | None, rank: int, tp_size: int):
        directory, name = uri.rsplit("/", 1) if "/" in uri else (".", uri)
        self.base = open_checkpoint(directory, storage_options)
        self.description = self.base.json(name)
        if self.description.get("type") != "ds_model" or self.description.get("parallelization", "tp") != "tp":
            raise CheckpointError(f"{uri}: expected a ds_model description with parallelization 'tp', got "
                                  f"type={self.description.get('type')!r}")
        saved = self.description.get("tp_size")
        if saved != tp_size:
            raise CheckpointError(f"{uri}: sharded for tp_size={saved}, asked to load at tp_size={tp_size} "
                                  "(re-sharding pre-sharded checkpoints is not supported yet)")
        files = self.description.get("checkpoints", {})
        self.files = list(files.get("non_tp", [])) + [files["tp"][rank]]

    @property
    def bytes_read(self) -> int:
        return self.base.bytes_read

    def hf_config(self):
        return self.base.hf_config()

    def generation_config(self):
        return self.base.generation_config()

    def tokenizer(self):
        return self.base.tokenizer()

    def tensors(self):
        return self.base.file_tensors(self.files)

    def __len__(self) -> int:
        return sum(1 for _ in self.tensors())


def open_any(uri: str, storage_options: dict | None, rank: int, tp_size: int) -> Checkpoint | ShardedCheckpoint:
    """An HF directory, or a pre-sharded description (a path ending in .json)."""
    if is_description(uri):
        return ShardedCheckpoint(uri, storage_options, rank, tp_size)
    return open_checkpoint(uri, storage_options)


def save_shards(model: CausalLM, uri: str, storage_options: dict | None, hf_config, generation_config,
                tokenizer=None) -> str:
    """Every rank writes its shard; rank 0 also the replicated tensors, the description and the
    HF config/tokenizer files. Returns the description's URI."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    tp = model.tp
    sharded = {n: p for n, p in model.named_parameters() if getattr(p, "tp_dim", None) is not None}
    fs.pipe(f"{root}/tp_{tp.rank:02d}.safetensors", _encode(sharded))
    if tp.rank == 0:
        replicated = {n: p for n, p in model.named_parameters() if n not in sharded}
        fs.pipe(f"{root}/non_tp.safetensors", _encode(replicated))
        _save_metadata(fs, root, hf_config, generation_config, tokenizer)
        description = {"type": "ds_model", "version": 1.0, "parallelization": "tp", "tp_size": tp.size,
                       "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
                       "checkpoints": {"non_tp": ["non_tp.safetensors"],
                                       "tp": [f"tp_{r:02d}.safetensors" for r in range(tp.size)]}}
        fs.pipe(f"{root}/{DESCRIPTION}", json.dumps(description, indent=2).encode())
    return f"{uri.rstrip('/')}/{DESCRIPTION}"


def _encode(params: dict[str, torch.Tensor]) -> bytes:
    return safetensors_bytes({n: p.detach().cpu().contiguous() for n, p in params.items()})


def _save_metadata(fs, root: str, hf_config, generation_config, tokenizer) -> None:
    with tempfile.TemporaryDirectory(prefix="rayspeed-meta-") as local:
        hf_config.save_pretrained(local)
        if generation_config is not None:
            generation_config.save_pretrained(local)
        if tokenizer is not None:
            tokenizer.save_pretrained(local)
        for name in os.listdir(local):
            fs.put(os.path.join(local, name), f"{root}/{name}")
