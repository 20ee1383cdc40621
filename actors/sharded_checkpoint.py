"""Pre-sharded checkpoints (what `save_mp_checkpoint_path` writes), and `open_any`, every rank's way in.

Layout (any fsspec URI), as DeepSpeed's `ds_inference_config.json` describes it:
    ds_inference_config.json   {"type": "ds_model", "version": 1.0, "parallelization": "tp",
                                "tp_size": N, "dtype": ..., "checkpoints": {"non_tp": [...], "tp": [...]}}
    non_tp.safetensors         replicated parameters (embeddings, norms, row-parallel biases)
    tp_00.safetensors ...      rank r's shard of every tensor-parallel parameter
    config.json, generation_config.json, tokenizer files
Names inside are the injected model's parameter names. A quantized model writes its linears' `qweight`
(int8/uint8) and `scales` (sharded like the weight: row-parallel scales along dim 1) and records its
`QuantSpec` as "quantization" in the description; such a checkpoint loads at the same tp_size and
quantization settings only (`check_quantization`). Loaded at the same tp_size each rank opens
only non_tp and its own file; at another tp_size each rank merges or splits the shards it needs
(`actors.reshard.ShardedCheckpoint`).
"""
import json
import os
import tempfile

import fsspec
import torch
from safetensors.torch import save as safetensors_bytes

from actors.checkpoint import Checkpoint, open_checkpoint
from actors.descriptions import is_description, open_description, resolve_description
from actors.loader import CheckpointError
from actors.tensor_files import DescribedCheckpoint
from kernels.model import CausalLM
from kernels.quant import QuantSpec

DESCRIPTION = "ds_inference_config.json"


def open_any(uri: str | dict, storage_options: dict | None, rank: int,
             tp_size: int) -> Checkpoint | DescribedCheckpoint:
    """An HF directory (path or URI), or a checkpoint description (a path ending in .json, or a dict):
    resolved by the driver already, or here (paths relative to the description, config next to it)."""
    if is_description(uri):
        resolved = resolve_description(uri, "", storage_options, None, tp_size)
        return open_description(resolved, storage_options, rank, tp_size)
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
                       **({"quantization": model.quant.to_dict()} if model.quant else {}),
                       "checkpoints": {"non_tp": ["non_tp.safetensors"],
                                       "tp": [f"tp_{r:02d}.safetensors" for r in range(tp.size)]}}
        fs.pipe(f"{root}/{DESCRIPTION}", json.dumps(description, indent=2).encode())
    return f"{uri.rstrip('/')}/{DESCRIPTION}"


def check_quantization(ckpt, quant: QuantSpec | None) -> None:
    """CheckpointError unless a pre-quantized checkpoint is loaded with the settings it was saved with."""
    saved = ckpt.quantization() if hasattr(ckpt, "quantization") else None
    wanted = quant.to_dict() if quant else None
    if saved is not None and saved != wanted:
        raise CheckpointError(f"{ckpt.description.get('source')}: the checkpoint is quantized with {saved}; the config "
                          f"asks for {wanted or 'a float model'}: pass the dtype and quantization settings it was "
                          "saved with (dtype=torch.int8 or 'int4', quantization_setting/quant)")


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
