"""Merge/split across tensor-parallel degrees: a parameter saved as M shards seen as one full
tensor, so each rank's weight loader keeps its own slice at any TP degree T.

A parameter splits along `dim` into *parts* (q, k, v of a fused QKV; gate, up of a merged MLP; one
part otherwise), each a run of *units* (heads of `head_dim` rows, or single rows). Shard s of M holds,
of every part, the units `held(s, M, units)`, parts side by side: [q_s; k_s; v_s], [gate_s; up_s] --
the layout `QKVParallelLinear` and `MergedColumnParallelLinear` keep per rank. With fewer units than
shards (KV heads < M) each unit is replicated on M / units shards; the full view takes each unit
once, from a shard this rank reads anyway where one holds it.

`ShardedCheckpoint` reads checkpoints saved that way under the injected names
(`save_mp_checkpoint_path`, ds_model descriptions with parallelization 'tp').
"""
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
from torch.overrides import TorchFunctionMode

from actors.loader import CheckpointError
from actors.tensor_files import DescribedCheckpoint
from actors.tensor_views import ConcatTensor, DeferredTensor
from kernels.linear import SINGLE, MergedColumnParallelLinear, QKVParallelLinear
from kernels.model import CausalLM
from kernels.spec import ModelSpec
from policies.base import WeightTarget
from policies.registry import policy_for


@dataclass(frozen=True)
class Part:
    units: int                  # heads, or rows
    unit_size: int = 1          # elements along the split dimension per unit


@dataclass(frozen=True)
class Layout:
    """A parameter's full shape and how it splits: `dim` None means replicated on every rank."""
    shape: tuple[int, ...]
    dim: int | None = None
    parts: tuple[Part, ...] = ()

    def shard_shape(self, shard: int, num_shards: int) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        shape = list(self.shape)
        shape[self.dim] = sum(len(held(shard, num_shards, p.units)) * p.unit_size for p in self.parts)
        return tuple(shape)


def held(shard: int, num_shards: int, units: int) -> range:
    """The units of one part that shard `shard` of `num_shards` holds: an even share; with fewer units
    than shards, unit shard // (num_shards // units), replicated (as `QKVParallelLinear` does)."""
    if num_shards <= units:
        if units % num_shards:
            raise CheckpointError(f"{units} heads/rows do not split evenly into {num_shards} shards")
        n = units // num_shards
        return range(shard * n, (shard + 1) * n)
    if num_shards % units:
        raise CheckpointError(f"{num_shards} shards do not replicate {units} heads evenly")
    unit = shard // (num_shards // units)
    return range(unit, unit + 1)


def shard_sources(rank: int, tp_size: int, num_shards: int) -> range:
    """The saved shards (of `num_shards`) that hold part of rank `rank`'s slice at `tp_size`."""
    return range(rank * num_shards // tp_size, -(-(rank + 1) * num_shards // tp_size))


def layouts(spec: ModelSpec) -> dict[str, Layout]:
    """Every parameter of the injected model for `spec`, with its full shape and split (from a model
    built on the meta device: each parameter's `tp_dim`, and the parts of its fused layer)."""
    with _EmptyOnMeta():
        model = CausalLM(spec, torch.float32, SINGLE)
    fused: dict[str, tuple[Part, ...]] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, QKVParallelLinear):
            heads = (spec.num_heads, spec.num_kv_heads, spec.num_kv_heads)
            parts = tuple(Part(n, spec.head_dim) for n in heads)
        elif isinstance(module, MergedColumnParallelLinear):
            parts = tuple(Part(size) for size in module.part_sizes)
        else:
            continue
        for name, _ in module.named_parameters(recurse=False):
            fused[f"{prefix}.{name}"] = parts
    result = {}
    for name, param in model.named_parameters():
        dim = getattr(param, "tp_dim", None)
        parts = fused.get(name, (Part(param.shape[dim]),) if dim is not None else ())
        result[name] = Layout(tuple(param.shape), dim, parts)
    return result


class _EmptyOnMeta(TorchFunctionMode):
    """Only `torch.empty` (how layers allocate their parameters) lands on the meta device; small
    constants such as ALiBi slopes, which need real numbers, are still computed."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.empty:
            kwargs = {**(kwargs or {}), "device": "meta"}
        return func(*args, **(kwargs or {}))


def check_degrees(spec: ModelSpec, saved: int, tp_size: int, source: str) -> None:
    """Raise `CheckpointError` unless both the saved degree and `tp_size` split the model's heads."""
    for degree, what in ((tp_size, "tp_size"), (saved, "the checkpoint's tensor-parallel degree")):
        try:
            spec.check_tp(degree)
        except ValueError as e:
            raise CheckpointError(f"{source}: {what} {degree}: {e}") from None


def full_view(shards: Sequence, layout: Layout, prefer: range):
    """The full tensor seen through the shards it was saved as (lazy: only narrowed parts are read)."""
    pieces = []
    for p, part in enumerate(layout.parts):
        for s in _holders(part.units, len(shards), prefer):
            offset = sum(len(held(s, len(shards), q.units)) * q.unit_size for q in layout.parts[:p])
            size = len(held(s, len(shards), part.units)) * part.unit_size
            pieces.append(shards[s].narrow(layout.dim, offset, size))
    return pieces[0] if len(pieces) == 1 else ConcatTensor(pieces, layout.dim)


def _holders(units: int, num_shards: int, prefer: range) -> list[int]:
    """One shard per run of units, in unit order; replicated units from a preferred shard if possible."""
    if num_shards <= units:
        return list(range(num_shards))
    replicas = num_shards // units
    choice = []
    for unit in range(units):
        holders = range(unit * replicas, (unit + 1) * replicas)
        choice.append(next((s for s in holders if s in prefer), holders[0]))
    return choice


def check_shape(url: str, name: str, view, expected: tuple, what: str):
    if tuple(view.shape) != tuple(expected):
        raise CheckpointError(f"{url}: tensor {name!r} ({what}): expected shape {tuple(expected)}, "
                              f"found {tuple(view.shape)}")
    return view


class InjectedNames:
    """Weight policy for full tensors under the injected model's own names: each goes whole to its
    parameter's weight loader, which keeps this rank's slice."""
    name = "injected"

    def target(self, name: str) -> WeightTarget:
        return WeightTarget(name, None, False)


class RankShards(InjectedNames):
    """Weight policy for this rank's own shards as saved (a pre-quantized checkpoint): copied as they are."""
    pre_sharded = True


class ShardedCheckpoint(DescribedCheckpoint):
    """M tensor-parallel shards under the injected names, loaded at any TP degree that splits the
    heads. Resolved description: `files` (chunk-major: file i * M + s is chunk i of shard s), `mp_size`
    M, `non_tp` (files of replicated tensors; else they are read from a shard this rank reads),
    `quantization` (a quantized model's `QuantSpec` as a dict, or None).

    A quantized checkpoint loads at its own degree only: each rank reads its int8/uint8 `qweight` and
    `scales` as saved (never dequantized). Resharding it would need new scales (row groups and a
    row-parallel rank's scales are per shard), so another degree is a `CheckpointError`."""

    def quantization(self) -> dict | None:
        return self.description.get("quantization")

    def policy(self) -> InjectedNames:
        return RankShards() if self.quantization() else InjectedNames()

    def tensors(self):
        if self.quantization():
            yield from self._own_shard()
            return
        config = self.hf_config()
        num_shards = self.description["mp_size"]
        prefer = shard_sources(self.rank, self.tp_size, num_shards)
        for name, layout in layouts(policy_for(config).spec(config)).items():
            if layout.dim is None:
                urls = self.description.get("non_tp", []) + self._chunks(prefer.start)
                yield name, self._fetch(urls, name, layout.shape, "replicated")
                continue
            shards = [DeferredTensor(layout.shard_shape(s, num_shards),
                                     partial(self._fetch, self._chunks(s), name, layout.shard_shape(s, num_shards),
                                             f"shard {s} of {num_shards}"))
                      for s in range(num_shards)]
            yield name, full_view(shards, layout, prefer)

    def _own_shard(self):
        saved = self.description["mp_size"]
        if saved != self.tp_size:
            raise CheckpointError(f"{self.description.get('source')}: a quantized checkpoint saved at tensor-parallel "
                                  f"degree {saved} loads only at tp_size={saved}, not {self.tp_size} (per-shard "
                                  "scales); save it again from the float checkpoint at this degree")
        for url in self.description.get("non_tp", []) + self._chunks(self.rank):
            yield from self.files.tensors(url).items()

    def _chunks(self, shard: int) -> list[str]:
        files, num_shards = self.description["files"], self.description["mp_size"]
        return files[shard::num_shards]

    def _fetch(self, urls: list[str], name: str, expected: tuple, what: str):
        for url in urls:
            found = self.files.tensors(url)
            if name in found:
                return check_shape(url, name, found[name], expected, what)
        raise CheckpointError(f"{', '.join(urls)}: tensor {name!r} ({what}) missing")
