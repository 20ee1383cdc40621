"""Loading a checkpoint's tensors into the injected model through a policy's weight rules."""
from typing import Iterable

import torch
from tqdm.auto import tqdm

from kernels.linear import default_weight_loader
from kernels.model import CausalLM
from policies.base import Policy, WeightTarget


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the tensor and the problem."""


def load_weights(model: CausalLM, policy: Policy | None, tensors: Iterable[tuple[str, torch.Tensor]],
                 total: int | None = None, progress: bool = True) -> None:
    """Feed (HF name, full tensor) pairs to the weight loaders; every parameter must be filled.
    With `policy=None` the tensors are this rank's shards already, under the injected names."""
    params = dict(model.named_parameters())
    family = policy.name if policy else "injected"
    loaded: set[str] = set()
    for hf_name, tensor in tqdm(tensors, total=total, desc="loading weights", unit="tensor",
                                disable=not progress, leave=False):
        target = policy.target(hf_name) if policy else WeightTarget(hf_name, None, False)
        if target is None or target.name in model.optional_targets:
            continue
        if target.name not in params:
            raise CheckpointError(f"{hf_name}: maps to {target.name!r}, which the {family} model lacks")
        param = params[target.name]
        try:
            if target.transpose:
                tensor = tensor.t()
            if target.transform is not None:
                tensor = target.transform(tensor, model.spec)
            loader = getattr(param, "weight_loader", default_weight_loader) if policy else default_weight_loader
            loader(param, tensor, target.shard)
        except ValueError as e:
            raise CheckpointError(f"{hf_name} -> {target.name}: {e}") from None
        loaded.add(target.name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"checkpoint lacks tensors for {len(missing)} parameter(s) of the "
                              f"{family} model: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
