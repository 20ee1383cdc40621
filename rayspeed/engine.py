"""`init_inference` and `InferenceEngine`: the public entry points, wiring only."""
from typing import TYPE_CHECKING

from torch import nn

from actors.outputs import RequestOutput, add_text
from actors.sequence import SamplingParams
from cluster import backends
from cluster.config import ConfigError, InferenceConfig, make_config
from cluster.generation import encode_prompts, token_list
from cluster.hf_backend import HFBackend
from cluster.hf_module import InjectedModelForCausalLM

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class InferenceEngine:
    """What `init_inference` returns. `module` is the HF drop-in (with AutoTP or without kernel injection:
    the HF model itself); `generate` is the fast path."""

    def __init__(self, module: nn.Module, backend, config: InferenceConfig, tokenizer=None):
        self.module, self.backend, self.config, self.tokenizer = module, backend, config, tokenizer

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def generate(self, prompts, **sampling) -> list[RequestOutput]:
        """Generate for a prompt or a batch (strings or token ids); sampling keywords as `SamplingParams`
        (max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
        stop_token_ids, ignore_eos, seed, n, logprobs). Stops at the model's EOS unless told otherwise."""
        ids, texts = encode_prompts(prompts, self.tokenizer)
        if "stop_token_ids" not in sampling:
            sampling["stop_token_ids"] = tuple(token_list(self.module.generation_config.eos_token_id))
        params = SamplingParams.build(**sampling)
        return add_text(self.backend.generate(ids, params), self.tokenizer, texts)

    def shutdown(self) -> None:
        """Release the TP group (its actors and placement group), if the model runs on one."""
        if hasattr(self.backend, "shutdown"):
            self.backend.shutdown()


def _check_supported(config: InferenceConfig) -> None:
    if config.injection_policy is not None and config.replace_with_kernel_inject:
        raise ConfigError("injection_policy (AutoTP: the HF modules sharded as they are) and "
                          "replace_with_kernel_inject=True (the injected decoder) exclude each other: choose one")
    described = isinstance(config.checkpoint, dict) or str(config.checkpoint).endswith(".json")
    if described and not config.replace_with_kernel_inject:
        raise ConfigError("checkpoint descriptions (checkpoint.json) load into the injected model: pass "
                          "replace_with_kernel_inject=True")
    if config.weight_bits and not config.replace_with_kernel_inject:
        raise ConfigError(f"dtype={config.dtype} quantizes the injected decoder's linears: pass "
                          "replace_with_kernel_inject=True")


def init_inference(model: "nn.Module | PretrainedConfig | None" = None,
                   config: InferenceConfig | dict | None = None, tokenizer=None, **kwargs) -> InferenceEngine:
    """Wrap an HF causal LM (or a checkpoint URI) for inference; DeepSpeed's keywords, see `InferenceConfig`.
    Without kernel injection the HF model runs as it is; with tp_size > 1 its blocks are first sharded in
    place, as `injection_policy` says or inferred (AutoTP; under a launcher: `rayspeed --num_gpus N script.py`).

    `checkpoint=` an HF directory/URI, or a description (`checkpoint.json` path or dict: Megatron, ds_model,
    BLOOM; see `actors.descriptions`) with paths relative to `base_dir`; `model` may then be just the model
    config (an HF config, or a model on the meta device), which wins over a config.json found with the files."""
    config = make_config(config, **kwargs)
    _check_supported(config)
    if not config.replace_with_kernel_inject:
        module = backends.auto_tp(model, config)
        return InferenceEngine(module, HFBackend(module), config, tokenizer)
    if config.tp_size == 1:
        built = backends.local(model, config, tokenizer=tokenizer)
    elif backends.launched_spmd():
        built = backends.spmd(model, config, tokenizer)
    else:
        built = backends.on_ray(model, config, tokenizer)
    local_model = getattr(built.backend, "model", None)     # quantized: label the activations' dtype
    dtype = local_model.embed.weight.dtype if local_model is not None else config.torch_dtype
    module = InjectedModelForCausalLM(built.backend, built.hf_config, built.generation_config, dtype)
    return InferenceEngine(module, built.backend, config, tokenizer or built.tokenizer)
