"""Build one rank's injected model and engine: policy -> spec -> model shard -> weights -> engine."""
from typing import Iterable

import torch

from actors.llm_engine import LLMEngine
from actors.loader import load_weights
from kernels.linear import SINGLE, TensorParallel
from kernels.model import CausalLM
from policies.registry import policy_for


def default_device(config) -> torch.device:
    if config.device:
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_engine(hf_config, tensors: Iterable[tuple[str, torch.Tensor]], config, tp: TensorParallel = SINGLE,
                 num_tensors: int | None = None, device: torch.device | None = None,
                 progress: bool = True) -> LLMEngine:
    """The injected model for `hf_config`, loaded from (name, tensor) pairs, inside an engine."""
    policy = policy_for(hf_config)
    spec = policy.spec(hf_config)
    device = device or default_device(config)
    with torch.device(device):
        model = CausalLM(spec, config.torch_dtype, tp)
    load_weights(model, policy, tensors, total=num_tensors, progress=progress)
    return LLMEngine(model.eval(), config, device)
