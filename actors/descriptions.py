"""Checkpoint descriptions: DeepSpeed's `checkpoint.json` (a path/URL, or a dict) naming weight files.

    {"type": "Megatron", "version": 0.0, "checkpoints": ["mp_rank_00/model_optim_rng.pt", ...]}
        Megatron-LM GPT, one file per model-parallel rank ("mp_size" optional)   -> actors.megatron
    {"type": "ds_model", "version": 1.0, "parallelization": "tp", "tp_size": M,
     "checkpoints": {"non_tp": [...], "tp": [...]}}  what save_mp_checkpoint_path writes
    {"type": "ds_model", "parallelization": "tp", "tp_size": M, "checkpoints": [...]}
        k * M files under the injected names, file i * M + s = chunk i of shard s  -> actors.reshard
    {"type": "ds_model" | "BLOOM", "version": ..., "checkpoints": "file" | [...]}
        whole tensors ("pp", DeepSpeed's default), HF names (through the family's policy) or the
        injected model's; every rank reads each file's header or maps it, then only its slices

Paths: URLs and absolute paths as they are; relative ones against the description's own "base_dir",
else `base_dir` (init_inference's keyword), else the description file's directory, else the cwd.

Model config, the first found wins: the `model` argument (an HF config, or anything with an HF
`.config`, such as a model built on the meta device; its weights are not used); config.json in the
description's directory, then in base_dir, then next to the first weight file; for Megatron, the
first file's training `args`. Generation config and tokenizer come from the directory whose
config.json was used, else from the description's directory.

`resolve_description` runs once in the driver: paths, config, and the checks that need no weights;
its result is a plain dict (it travels to every rank inside the frozen config) `open_description` opens.
"""
import json

import fsspec
import transformers

from actors.checkpoint import open_checkpoint
from actors.loader import CheckpointError
from actors.megatron import MegatronCheckpoint, config_from_args, read_shard
from actors.reshard import InjectedNames, ShardedCheckpoint, check_degrees, layouts
from actors.tensor_files import DescribedCheckpoint, TensorFiles, config_from_dict, split_url
from policies.registry import policy_for

KINDS = ("megatron", "ds_model", "bloom")


def is_description(checkpoint) -> bool:
    return isinstance(checkpoint, dict) or (isinstance(checkpoint, str) and checkpoint.endswith(".json"))


def resolve_description(checkpoint: str | dict, base_dir: str = "", storage_options: dict | None = None,
                        model=None, tp_size: int = 1) -> dict:
    """The description at `checkpoint` with absolute file URLs, its saved tensor-parallel degree and the
    model config (see the module doc); raises `CheckpointError` for what is wrong before any weight is read."""
    if isinstance(checkpoint, dict) and checkpoint.get("resolved"):
        return checkpoint
    raw, source, own_dir = _read(checkpoint, storage_options)
    kind = str(raw.get("type", "")).lower()
    if kind not in KINDS:
        raise CheckpointError(f"{source}: type {raw.get('type')!r}: expected one of Megatron, ds_model, BLOOM")
    root = raw.get("base_dir") or base_dir or own_dir or "."
    resolved = {"resolved": True, "type": kind, "version": raw.get("version"), "source": source,
                "quantization": raw.get("quantization"), **_files(raw, kind, source, root)}
    dirs = [own_dir, raw.get("base_dir") or base_dir or None, split_url(resolved["files"][0])[0]]
    config, config_from, meta_dir = _model_config(model, dirs, storage_options)
    if config is None and kind == "megatron":
        url = resolved["files"][0]                   # the driver maps file 0 for its pickle only
        config = config_from_args(read_shard(TensorFiles(storage_options), url)["args"], url)
        config_from = f"args in {url}"
    if config is None:
        raise CheckpointError(f"{source}: no model config: pass it (init_inference(hf_config_or_meta_model, "
                              f"checkpoint=...)) or put config.json in {' or '.join(d for d in dirs if d)}")
    resolved.update(config=config, config_from=config_from, meta_dir=meta_dir or own_dir or dirs[1])
    _check(resolved, tp_size)
    return resolved


def open_description(resolved: dict, storage_options: dict | None, rank: int, tp_size: int) -> DescribedCheckpoint:
    """Rank `rank`'s reader of a resolved description."""
    if resolved["type"] == "megatron":
        return MegatronCheckpoint(resolved, storage_options, rank, tp_size)
    if resolved["parallelization"] == "tp":
        return ShardedCheckpoint(resolved, storage_options, rank, tp_size)
    return FileListCheckpoint(resolved, storage_options, rank, tp_size)


class FileListCheckpoint(DescribedCheckpoint):
    """Files of whole tensors, HF names (the family's policy) or the injected model's: every rank
    sees each whole tensor lazily and its weight loaders read only their slices."""

    def policy(self):
        config = self.hf_config()
        injected = set(layouts(policy_for(config).spec(config)))
        first = self.files.tensors(self.description["files"][0])
        return InjectedNames() if injected & set(first) else policy_for(config)

    def tensors(self):
        for url in self.description["files"]:
            yield from self.files.tensors(url).items()


def _read(checkpoint: str | dict, storage_options: dict | None) -> tuple[dict, str, str | None]:
    """(description, its name for errors, its directory or None for a dict)."""
    if isinstance(checkpoint, dict):
        return checkpoint, "checkpoint description (dict)", None
    fs, path = fsspec.core.url_to_fs(checkpoint, **(storage_options or {}))
    try:
        raw = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint}: no such checkpoint description") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{checkpoint}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{checkpoint}: expected a JSON object, found {type(raw).__name__}")
    return raw, checkpoint, split_url(checkpoint)[0]


def _files(raw: dict, kind: str, source: str, root: str) -> dict:
    """files (absolute), non_tp, parallelization and mp_size (the saved degree) of a description."""
    listed = raw.get("checkpoints")
    if isinstance(listed, dict) and kind == "ds_model":              # save_mp_checkpoint_path's layout
        files, non_tp, parallel = listed.get("tp"), listed.get("non_tp", []), "tp"
    else:
        files, non_tp = [listed] if isinstance(listed, str) else listed, []
        parallel = {"megatron": "tp", "bloom": "pp"}.get(kind) or str(raw.get("parallelization", "pp")).lower()
    if not files or not isinstance(files, list) or not all(isinstance(f, str) for f in files + list(non_tp)):
        raise CheckpointError(f"{source}: 'checkpoints' must list weight files, found {listed!r}")
    declared = raw.get("mp_size", raw.get("tp_size")) if parallel == "tp" else 1
    mp_size = declared or len(files)
    one_per_rank = kind == "megatron"
    if not isinstance(mp_size, int) or mp_size < 1 or len(files) % mp_size or one_per_rank and mp_size != len(files):
        raise CheckpointError(f"{source}: declares tensor-parallel degree {declared} but lists {len(files)} "
                              f"file(s) {'(one per rank expected)' if one_per_rank else '(a multiple expected)'}")
    absolute = [_join(root, f) for f in files]
    return {"files": absolute, "non_tp": [_join(root, f) for f in non_tp], "parallelization": parallel,
            "mp_size": mp_size}


def _join(root: str, path: str) -> str:
    return path if "://" in path or path.startswith("/") else f"{root.rstrip('/')}/{path}"


def _model_config(model, dirs: list[str | None], storage_options) -> tuple[dict | None, str | None, str | None]:
    """(config dict, where it came from, a directory with config/tokenizer files) by the module doc's order."""
    if isinstance(model, transformers.PretrainedConfig):
        return model.to_dict(), "the model argument", None
    if model is not None:
        config = getattr(model, "config", None)
        if not isinstance(config, transformers.PretrainedConfig):
            raise CheckpointError(f"init_inference's model {type(model).__name__}: with a checkpoint description, "
                                  "pass an HF config or a model (e.g. on the meta device) with an HF .config")
        return config.to_dict(), f"the model argument's .config ({type(model).__name__})", None
    for directory in dict.fromkeys(d for d in dirs if d):
        try:
            ck = open_checkpoint(directory, storage_options)
        except CheckpointError:
            continue
        if "config.json" in ck.names:
            return ck.json("config.json"), f"{directory}/config.json", directory
    return None, None, None


def _check(resolved: dict, tp_size: int) -> None:
    config, source = config_from_dict(resolved["config"]), resolved["source"]
    if resolved["type"] == "megatron" and config.model_type != "gpt2":
        raise CheckpointError(f"{source}: Megatron GPT checkpoints load as GPT-2; the model config says "
                              f"model_type={config.model_type!r}")
    spec = policy_for(config).spec(config)
    check_degrees(spec, resolved["mp_size"], tp_size, source)
