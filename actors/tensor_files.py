"""Reading the files a checkpoint description names (`checkpoint.json`, `ds_inference_config.json`).

`TensorFiles` opens each file once per process, by URL: safetensors by their header (tensors are
`LazyTensor`s read by range), `.pt`/`.bin` files memory-mapped (remote ones downloaded first) with
their tensors wrapped as `MappedTensor`s; `bytes_read` counts what was fetched or copied out.
`DescribedCheckpoint` is the base of every reader of described files: the model config travels
in the resolved description, generation config and tokenizer come from its `meta_dir`.
"""
import types

import torch
import transformers

from actors.checkpoint import Checkpoint, load_pt, open_checkpoint
from actors.lazy_tensor import LazyTensor
from actors.loader import CheckpointError
from actors.tensor_views import MappedTensor


def split_url(url: str) -> tuple[str, str]:
    """(directory, file name) of a file URL or path."""
    directory, _, name = url.rstrip("/").rpartition("/")
    return directory or ".", name


class TensorFiles:
    """Weight files by URL, each opened once; `bytes_read` counts every byte fetched or copied out."""

    def __init__(self, storage_options: dict | None):
        self.storage_options = storage_options
        self.mapped = types.SimpleNamespace(bytes_read=0)      # bytes copied out of memory-mapped files
        self._dirs: dict[str, Checkpoint] = {}
        self._flat: dict[str, dict] = {}
        self._objects: dict[str, object] = {}

    @property
    def bytes_read(self) -> int:
        return self.mapped.bytes_read + sum(ck.bytes_read for ck in self._dirs.values())

    def tensors(self, url: str) -> dict:
        """{name: lazy view} of a flat weight file (safetensors, or a `.pt`/`.bin` state dict)."""
        if url not in self._flat:
            ck, name = self._locate(url)
            self._flat[url] = {n: t if isinstance(t, LazyTensor) else MappedTensor(t, self.mapped)
                               for n, t in ck.file_tensors([name])}
        return self._flat[url]

    def load(self, url: str, allow: tuple = ()) -> object:
        """A `.pt` file's whole pickled object (tensors memory-mapped), loaded with `weights_only=True`
        plus the classes in `allow`."""
        if url not in self._objects:
            ck, name = self._locate(url)
            self._objects[url] = load_pt(url, ck.local_path(name), allow)
        return self._objects[url]

    def mapped_view(self, tensor: torch.Tensor) -> MappedTensor:
        return MappedTensor(tensor, self.mapped)

    def _locate(self, url: str) -> tuple[Checkpoint, str]:
        directory, name = split_url(url)
        if directory not in self._dirs:
            try:
                self._dirs[directory] = open_checkpoint(directory, self.storage_options)
            except CheckpointError:
                raise CheckpointError(f"{url}: listed by the checkpoint description, not found (no directory "
                                      f"{directory})") from None
        ck = self._dirs[directory]
        if name not in ck.names:
            raise CheckpointError(f"{url}: listed by the checkpoint description, not found")
        return ck, name


def config_from_dict(config: dict) -> transformers.PretrainedConfig:
    """An HF config from its dict, built by the class its `model_type` names (no hub access)."""
    model_type = config.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise CheckpointError(f"model config: unknown model_type {model_type!r}")
    return transformers.CONFIG_MAPPING[model_type].from_dict(config)


class DescribedCheckpoint:
    """One rank's view of the files a resolved description names (see `actors.descriptions`).
    Subclasses give `tensors()` and the `policy()` that maps their names onto the injected model."""

    def __init__(self, description: dict, storage_options: dict | None, rank: int, tp_size: int):
        self.description, self.rank, self.tp_size = description, rank, tp_size
        self.storage_options = storage_options
        self.files = TensorFiles(storage_options)
        self._meta: Checkpoint | None = None

    @property
    def bytes_read(self) -> int:
        return self.files.bytes_read + (self._meta.bytes_read if self._meta else 0)

    def hf_config(self) -> transformers.PretrainedConfig:
        return config_from_dict(self.description["config"])

    def generation_config(self) -> transformers.GenerationConfig:
        """generation_config.json next to the description's config, else the model config's defaults."""
        meta = self.meta()
        if meta is not None and "generation_config.json" in meta.names:
            return transformers.GenerationConfig.from_dict(meta.json("generation_config.json"))
        return transformers.GenerationConfig.from_model_config(self.hf_config())

    def tokenizer(self):
        meta = self.meta()
        return meta.tokenizer() if meta is not None else None

    def meta(self) -> Checkpoint | None:
        if self._meta is None and self.description.get("meta_dir"):
            try:
                self._meta = open_checkpoint(self.description["meta_dir"], self.storage_options)
            except CheckpointError:                  # no such directory: no tokenizer, default generation
                self.description = {**self.description, "meta_dir": None}
        return self._meta

    def tensors(self):
        raise NotImplementedError

    def policy(self):
        raise NotImplementedError

    def __len__(self) -> int:
        return sum(1 for _ in self.tensors())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description.get('source')!r}, rank={self.rank}/{self.tp_size})"
