"""Build one rank's injected model and engine: policy -> spec -> model shard -> weights -> engine."""
from typing import Iterable

import torch

from actors.llm_engine import LLMEngine
from actors.loader import load_weights
from actors.sharded_checkpoint import check_quantization, save_shards
from actors.tensor_files import DescribedCheckpoint
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
                 progress: bool = True, weight_policy=None) -> LLMEngine:
    """The injected model for `hf_config`, loaded from (name, full tensor) pairs, inside an engine.
    `weight_policy` maps the pairs' names onto the model (default: the family's HF names)."""
    policy = policy_for(hf_config)
    spec = policy.spec(hf_config)
    spec.check_tp(tp.size)
    device = device or default_device(config)
    with torch.device(device):
        model = CausalLM(spec, config.compute_dtype(device), tp, config.weight_quant())
    load_weights(model, weight_policy or policy, tensors, total=num_tensors, progress=progress)
    model.quantize_head()
    return LLMEngine(model.eval(), config, device)


def load_engine(ckpt, config, tp: TensorParallel = SINGLE, device: torch.device | None = None) -> LLMEngine:
    """`build_engine` from an opened checkpoint (HF directory, or one a description names), then, when
    the config asks for it, write this rank's shard to `save_mp_checkpoint_path`."""
    weight_policy = ckpt.policy() if isinstance(ckpt, DescribedCheckpoint) else None
    hf_config = ckpt.hf_config()
    check_quantization(ckpt, config.weight_quant())
    engine = build_engine(hf_config, ckpt.tensors(), config, tp, len(ckpt), device, tp.rank == 0, weight_policy)
    if config.save_mp_checkpoint_path:
        save_shards(engine.model, config.save_mp_checkpoint_path, config.storage_options, hf_config,
                    ckpt.generation_config(), ckpt.tokenizer() if tp.rank == 0 else None)
    return engine
