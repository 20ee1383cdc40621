"""HF model directories at any fsspec URI (local path, `file://`, `memory://`, `s3://`, ...).

`open_checkpoint(uri)` lists the directory; config, generation config and tokenizer come from its
json/tokenizer files, and `tensors()` yields every weight: safetensors tensors as `LazyTensor`s
(only the header is read up front; each rank later reads just its slice), `.bin` tensors as
plain tensors. `save_checkpoint` writes a model (and tokenizer) as a safetensors HF directory.
"""
import json
import os
import tempfile
import zipfile
from typing import Iterator

import fsspec
import torch
import transformers
from fsspec.implementations.local import LocalFileSystem

from actors.lazy_tensor import DTYPES, FileReader, LazyTensor
from actors.loader import CheckpointError

# weight files in order of preference; the first one present is used
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
MAX_HEADER_BYTES = 100 * 2**20                  # safetensors' own limit


def open_checkpoint(uri: str, storage_options: dict | None = None) -> "Checkpoint":
    """The HF model directory at `uri`; `storage_options` go to the fsspec filesystem (e.g. S3 keys)."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    try:
        names = [os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{uri}: no such checkpoint directory") from None
    return Checkpoint(uri, fs, root.rstrip("/"), names)


class Checkpoint:
    """One HF model directory. `bytes_read` counts every byte fetched from its filesystem."""

    def __init__(self, uri: str, fs, root: str, names: list[str]):
        self.uri, self.fs, self.root = uri, fs, root
        self.names = set(names)
        self.reader = FileReader(fs)
        self._headers: dict[str, dict[str, LazyTensor]] = {}
        self._downloads: tempfile.TemporaryDirectory | None = None     # remote .bin files, made on first use

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    def hf_config(self) -> transformers.PretrainedConfig:
        """The model config from config.json, built by the class its `model_type` names (no hub access)."""
        config = self._json("config.json")
        model_type = config.get("model_type")
        if model_type not in transformers.CONFIG_MAPPING:
            raise CheckpointError(f"{self._path('config.json')}: unknown model_type {model_type!r}")
        return transformers.CONFIG_MAPPING[model_type].from_dict(config)

    def generation_config(self) -> transformers.GenerationConfig:
        """generation_config.json if present, else the generation defaults in the model config."""
        if "generation_config.json" in self.names:
            return transformers.GenerationConfig.from_dict(self._json("generation_config.json"))
        return transformers.GenerationConfig.from_model_config(self.hf_config())

    def tokenizer(self):
        """The HF tokenizer saved alongside the model (files copied to a local temp dir), or None."""
        files = [name for name in TOKENIZER_FILES if name in self.names]
        if not files:
            return None
        with tempfile.TemporaryDirectory(prefix="rayspeed-tok-") as local:
            for name in files + (["config.json"] if "config.json" in self.names else []):
                with open(os.path.join(local, name), "wb") as f:
                    f.write(self.reader.read(self._path(name)))
            return transformers.AutoTokenizer.from_pretrained(local)

    def tensors(self) -> Iterator[tuple[str, LazyTensor | torch.Tensor]]:
        """(HF name, tensor) for every weight, file by file: `LazyTensor`s from safetensors, tensors from `.bin`."""
        for file, names in self._shards():
            found = self._file_tensors(file)
            for name in names or found:
                if name not in found:
                    raise CheckpointError(f"{self._path(file)}: the index puts {name!r} here, the file lacks it")
                yield name, found[name]

    def __len__(self) -> int:
        return sum(len(names or self._file_tensors(file)) for file, names in self._shards())

    def file_tensors(self, files: list[str]) -> Iterator[tuple[str, LazyTensor | torch.Tensor]]:
        """(name, tensor) from the named weight files of this directory only (pre-sharded layouts)."""
        for file in files:
            if file not in self.names:
                raise CheckpointError(f"{self._path(file)}: listed by the checkpoint description, not found")
            yield from self._file_tensors(file).items()

    def json(self, name: str) -> dict:
        return self._json(name)

    def __repr__(self) -> str:
        return f"Checkpoint({self.uri!r})"

    # -- weight files -------------------------------------------------------------------------

    def _shards(self) -> list[tuple[str, list[str] | None]]:
        """Weight files in load order, each with the tensor names an index assigns it (None: all)."""
        chosen = next((name for name in WEIGHT_FILES if name in self.names), None)
        if chosen is None:
            raise CheckpointError(f"{self.uri}: no weights: expected one of {', '.join(WEIGHT_FILES)}; "
                                  f"found {', '.join(sorted(self.names)) or 'an empty directory'}")
        if not chosen.endswith(".index.json"):
            return [(chosen, None)]
        weight_map = self._json(chosen).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{self._path(chosen)}: no 'weight_map' of tensor name -> file")
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        return list(by_file.items())

    def _file_tensors(self, file: str) -> dict[str, LazyTensor | torch.Tensor]:
        if file.endswith(".safetensors"):
            if file not in self._headers:
                self._headers[file] = self._read_header(self._path(file))
            return self._headers[file]
        return self._load_bin(file)

    def _read_header(self, path: str) -> dict[str, LazyTensor]:
        """Parse a safetensors header (u64 little-endian length, then JSON) into lazy tensors."""
        file_size = self._size(path)
        if file_size < 8:
            raise CheckpointError(f"{path}: truncated: {file_size} bytes, too short for a safetensors header")
        length = int.from_bytes(self.reader.read(path, 0, 8), "little")
        if length > min(MAX_HEADER_BYTES, file_size - 8):
            raise CheckpointError(f"{path}: header length {length} does not fit a file of {file_size} bytes")
        try:
            header = json.loads(self.reader.read(path, 8, 8 + length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: header is not a JSON object")
        header.pop("__metadata__", None)
        data_start = 8 + length                      # data_offsets are relative to the end of the header
        entries = sorted(header.items(), key=lambda item: _entry_begin(item[1]))
        return {name: self._lazy_tensor(path, name, entry, data_start, file_size) for name, entry in entries}

    def _lazy_tensor(self, path: str, name: str, entry, data_start: int, file_size: int) -> LazyTensor:
        try:
            dtype, shape, (begin, end) = DTYPES[entry["dtype"]], list(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r}: bad header entry {entry!r}") from None
        if not all(isinstance(n, int) for n in [*shape, begin, end]):
            raise CheckpointError(f"{path}: tensor {name!r}: shape and data_offsets must be integers: {entry!r}")
        expected = torch.Size(shape).numel() * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {name!r}: {end - begin} bytes for shape {shape} {entry['dtype']}")
        if begin < 0 or data_start + end > file_size:
            raise CheckpointError(f"{path}: tensor {name!r}: bytes [{data_start + begin}, {data_start + end}) lie "
                                  f"outside the file of {file_size} bytes (truncated?)")
        return LazyTensor.stored(self.reader, path, data_start + begin, dtype, shape)

    def local_path(self, file: str) -> str:
        """A local path for one file of this directory: itself where local, else a downloaded copy
        (pickled `.pt`/`.bin` files cannot be read by range)."""
        path = self._path(file)
        return path if isinstance(self.fs, LocalFileSystem) else self._download(path)

    def _load_bin(self, file: str) -> dict[str, torch.Tensor]:
        """A `.bin` state dict, memory-mapped where local. Remote `.bin` files are downloaded whole
        (pickles cannot be read by range). Only tensors load: pickled code is refused."""
        path = self._path(file)
        state = load_pt(path, self.local_path(file))
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise CheckpointError(f"{path}: expected a dict of tensor name -> tensor")
        return state

    def _download(self, path: str) -> str:
        self._downloads = self._downloads or tempfile.TemporaryDirectory(prefix="rayspeed-ckpt-")
        local = os.path.join(self._downloads.name, os.path.basename(path))
        if not os.path.exists(local):
            data = self.reader.read(path)
            with open(local, "wb") as f:
                f.write(data)
        return local

    # -- small files --------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _size(self, path: str) -> int:
        try:
            return self.fs.size(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None

    def _json(self, name: str) -> dict:
        path = self._path(name)
        try:
            return json.loads(self.reader.read(path))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON: {e}") from None


def load_pt(path: str, local: str, allow: tuple = ()) -> object:
    """`torch.load` of a local `.pt`/`.bin` copy of `path` (named in errors): tensors, containers,
    numbers and strings only (`weights_only=True`), plus the classes in `allow`; memory-mapped when the
    file is a zip archive, so only the tensors read later are paged in. Pickled code is refused."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(local, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(local))
    except Exception as e:                           # weights_only refusals, bad zips, truncated pickles
        try:
            unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(local)) -
                            {f"{c.__module__}.{c.__qualname__}" for c in allow})
        except Exception:
            unsafe = []
        if unsafe:
            raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): it needs pickled code "
                                  f"({', '.join(unsafe)}); only tensors and plain containers load") from None
        detail = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: torch.load(weights_only=True) failed (truncated or corrupt?): "
                              f"{detail}") from None


def _entry_begin(entry) -> int:
    """Sort key: a header entry's data offset (malformed entries first; they fail when parsed)."""
    try:
        return int(entry["data_offsets"][0])
    except (KeyError, TypeError, ValueError, IndexError):
        return -1


def save_checkpoint(model, uri: str, tokenizer=None, max_shard_size: str | int = "2GB",
                    storage_options: dict | None = None) -> str:
    """Write an HF model (and tokenizer) as a safetensors HF directory at `uri`; returns `uri`.
    Remote URIs are written through a local temp dir, then uploaded file by file."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        _save_pretrained(model, tokenizer, root, max_shard_size)
        return uri
    with tempfile.TemporaryDirectory(prefix="rayspeed-save-") as local:
        _save_pretrained(model, tokenizer, local, max_shard_size)
        fs.makedirs(root, exist_ok=True)
        for name in sorted(os.listdir(local)):
            fs.put_file(os.path.join(local, name), f"{root.rstrip('/')}/{name}")
    return uri


def _save_pretrained(model, tokenizer, directory: str, max_shard_size: str | int) -> None:
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
