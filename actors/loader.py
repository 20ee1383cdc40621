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
    With `policy=None` (or a policy marked `pre_sharded`) the tensors are this rank's shards already,
    under the injected names. A float `<linear>.weight` of a quantized linear is quantized into its
    `qweight` and `scales` as it loads (`load_float_weight`)."""
    params = dict(model.named_parameters())
    quantized = {f"{name}.weight": m for name, m in model.named_modules() if hasattr(m, "qweight")}
    sharded = policy is not None and not getattr(policy, "pre_sharded", False)
    family = policy.name if policy else "injected"
    loaded: set[str] = set()
    for hf_name, tensor in tqdm(tensors, total=total, desc="loading weights", unit="tensor",
                                disable=not progress, leave=False):
        target = policy.target(hf_name) if policy else WeightTarget(hf_name, None, False)
        if target is None or target.name in model.optional_targets:
            continue
        if target.name in quantized and sharded:
            _load_quantized(quantized[target.name], hf_name, target, tensor, model)
            prefix = target.name.removesuffix(".weight")
            loaded.update({f"{prefix}.qweight", f"{prefix}.scales"})
            continue
        if target.name not in params:
            raise CheckpointError(f"{hf_name}: maps to {target.name!r}, which the {family} model lacks")
        param = params[target.name]
        try:
            loader = getattr(param, "weight_loader", default_weight_loader) if sharded else default_weight_loader
            loader(param, _oriented(tensor, target, model), target.shard)
        except ValueError as e:
            raise CheckpointError(f"{hf_name} -> {target.name}: {e}") from None
        loaded.add(target.name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"checkpoint lacks tensors for {len(missing)} parameter(s) of the "
                              f"{family} model: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")


def _oriented(tensor: torch.Tensor, target: WeightTarget, model: CausalLM) -> torch.Tensor:
    if target.transpose:
        tensor = tensor.t()
    if target.transform is not None:
        tensor = target.transform(tensor, model.spec)
    return tensor


def _load_quantized(linear, hf_name: str, target: WeightTarget, tensor: torch.Tensor, model: CausalLM) -> None:
    try:
        linear.load_float_weight(_oriented(tensor, target, model), target.shard)
    except ValueError as e:
        raise CheckpointError(f"{hf_name} -> {target.name} (quantized): {e}") from None
