"""`init_inference` and `InferenceEngine`: the public entry points, wiring only."""
import torch
from torch import nn

from actors.build import build_engine, default_device
from actors.outputs import RequestOutput, request_outputs
from actors.sequence import RequestError, SamplingParams
from cluster.config import ConfigError, InferenceConfig, make_config
from cluster.generation import token_list
from cluster.hf_backend import HFBackend
from cluster.hf_module import InjectedModelForCausalLM


class InferenceEngine:
    """What `init_inference` returns. `module` is the HF drop-in; `generate` is the fast path."""

    def __init__(self, module: nn.Module, backend, config: InferenceConfig, tokenizer=None):
        self.module, self.backend, self.config, self.tokenizer = module, backend, config, tokenizer

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _encode(self, prompts) -> tuple[list[list[int]], list[str] | None]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise RequestError("prompts must be a non-empty list of strings or of token-id lists")
        if all(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise RequestError("string prompts need a tokenizer: init_inference(..., tokenizer=...)")
            return [self.tokenizer(p)["input_ids"] for p in prompts], prompts
        if all(isinstance(p, list) for p in prompts):
            return prompts, None
        raise RequestError("prompts must be all strings or all token-id lists")

    def generate(self, prompts, **sampling) -> list[RequestOutput]:
        """Generate for a prompt or a batch (strings or token ids); sampling keywords as `SamplingParams`
        (max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
        stop_token_ids, ignore_eos, seed, n). Stops at the model's EOS unless told otherwise."""
        ids, texts = self._encode(prompts)
        if "stop_token_ids" not in sampling:
            sampling["stop_token_ids"] = tuple(token_list(self.module.generation_config.eos_token_id))
        params = SamplingParams.build(**sampling)
        groups = self.backend.generate(ids, params)
        return request_outputs(ids, groups, self.tokenizer, texts)


def _check_supported(config: InferenceConfig) -> None:
    later = {"tensor_parallel.tp_size > 1": config.tp_size > 1,
             "checkpoint": config.checkpoint is not None,
             "injection_policy": config.injection_policy is not None,
             "quantization_setting": config.quantization_setting is not None,
             "save_mp_checkpoint_path": config.save_mp_checkpoint_path is not None,
             "enable_cuda_graph": config.enable_cuda_graph}
    for name, used in later.items():
        if used:
            raise ConfigError(f"{name} is not yet supported by this build of rayspeed")


def init_inference(model: nn.Module, config: InferenceConfig | dict | None = None, tokenizer=None,
                   **kwargs) -> InferenceEngine:
    """Wrap an HF causal LM for inference (DeepSpeed's `init_inference` keywords; see `InferenceConfig`)."""
    config = make_config(config, **kwargs)
    _check_supported(config)
    if not config.replace_with_kernel_inject:
        module = model.to(device=default_device(config), dtype=config.torch_dtype).eval()
        return InferenceEngine(module, HFBackend(module), config, tokenizer)
    state = model.state_dict()
    backend = build_engine(model.config, state.items(), config, num_tensors=len(state))
    module = InjectedModelForCausalLM(backend, model.config, getattr(model, "generation_config", None),
                                      config.torch_dtype)
    return InferenceEngine(module, backend, config, tokenizer)
