"""HF `generate()` arguments -> the engine's `SamplingParams`, and engine results -> HF-shaped ids."""
import copy

import torch
from transformers import GenerationConfig

from actors.outputs import RequestOutput
from actors.sequence import RequestError, SamplingParams

# generate()'s own defaults for fields a GenerationConfig leaves unset (None)
HF_DEFAULTS = {"max_length": 20, "min_length": 0, "do_sample": False, "num_beams": 1, "temperature": 1.0,
               "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0, "num_return_sequences": 1}
# features the injected engine does not implement, with the value that means "off"
UNSUPPORTED = {"num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "output_scores": False,
               "output_logits": False, "output_attentions": False, "output_hidden_states": False,
               "return_dict_in_generate": False, "no_repeat_ngram_size": 0, "typical_p": 1.0,
               "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "bad_words_ids": None, "force_words_ids": None,
               "sequence_bias": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
               "suppress_tokens": None, "begin_suppress_tokens": None, "stop_strings": None,
               "prompt_lookup_num_tokens": None, "min_p": None}
IGNORED_KWARGS = {"use_cache", "synced_gpus", "token_type_ids"}


def merged_generation_config(base: GenerationConfig, generation_config: GenerationConfig | None,
                             kwargs: dict) -> GenerationConfig:
    """As generate() does: the call's config (or the model's) updated by the call's keyword arguments."""
    config = copy.deepcopy(generation_config if generation_config is not None else base)
    unused = {k: v for k, v in config.update(**kwargs).items() if k not in IGNORED_KWARGS}
    if unused:
        raise RequestError(f"generate() got arguments it does not support: {', '.join(sorted(unused))}")
    for name, off in UNSUPPORTED.items():
        value = getattr(config, name, off)
        if value is not None and value != off:
            extra = " (injected kernels do not do beam search, as in DeepSpeed)" if name == "num_beams" else ""
            raise RequestError(f"generate(): {name}={value!r} is not supported{extra}")
    return config


def _get(config: GenerationConfig, name: str):
    value = getattr(config, name, None)
    return HF_DEFAULTS.get(name) if value is None else value


def token_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return [value] if isinstance(value, int) else list(value)


def encode_prompts(prompts, tokenizer) -> tuple[list[list[int]], list[str] | None]:
    """A string, a token-id list, or a non-empty list of either -> (token-id lists, the strings if given)."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise RequestError("prompts must be a string, a token-id list, or a non-empty list of either")
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise RequestError("string prompts need a tokenizer (init_inference(..., tokenizer=...) or one saved "
                               "with the checkpoint); pass token ids instead")
        return [tokenizer(p)["input_ids"] for p in prompts], prompts
    if all(isinstance(p, list) for p in prompts):
        return prompts, None
    raise RequestError("prompts must be all strings or all token-id lists")


def sampling_params(config: GenerationConfig, padded_len: int) -> SamplingParams:
    """Lengths follow HF: max_length/min_length count the (padded) prompt, *_new_tokens do not."""
    max_new = config.max_new_tokens
    if max_new is None:
        max_new = _get(config, "max_length") - padded_len
        if max_new <= 0:
            raise RequestError(f"max_length={_get(config, 'max_length')} leaves no room after a prompt of "
                               f"{padded_len} tokens; set max_new_tokens")
    min_new = config.min_new_tokens if config.min_new_tokens is not None else \
        max(0, _get(config, "min_length") - padded_len)
    return SamplingParams.build(
        max_new_tokens=max_new, min_new_tokens=min(min_new, max_new), do_sample=_get(config, "do_sample"),
        temperature=_get(config, "temperature"), top_k=_get(config, "top_k"), top_p=_get(config, "top_p"),
        repetition_penalty=_get(config, "repetition_penalty"), n=_get(config, "num_return_sequences"),
        stop_token_ids=tuple(token_list(config.eos_token_id)))


def pad_token_id(config: GenerationConfig) -> int:
    if config.pad_token_id is not None:
        return int(token_list(config.pad_token_id)[0])
    eos = token_list(config.eos_token_id)
    return eos[0] if eos else 0


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Each row's real tokens (left or right padding removed)."""
    if attention_mask is None:
        return input_ids.tolist()
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]


def assemble(input_ids: torch.Tensor, results: list[RequestOutput], pad: int) -> torch.Tensor:
    """HF layout: row b*n + j = input row b as given (padding included) + sample j's tokens, pad-filled."""
    outputs = [c.token_ids for r in results for c in r.outputs]
    width = max(len(o) for o in outputs)
    new = torch.full((len(outputs), width), pad, dtype=input_ids.dtype)
    for row, out in enumerate(outputs):
        new[row, :len(out)] = torch.tensor(out, dtype=input_ids.dtype)
    prompts = input_ids.repeat_interleave(len(results[0].outputs), dim=0).cpu()
    return torch.cat([prompts, new], dim=1).to(input_ids.device)
