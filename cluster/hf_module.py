"""`InjectedModelForCausalLM`: the HF drop-in returned as `engine.module`.

`model(input_ids, attention_mask=...)` returns HF-shaped logits and `generate(...)` takes HF's
arguments, so `transformers.pipeline(...).model = engine.module` keeps working. Both run on the
engine backend (the local engine, or a TP group), never on HF modules.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from actors.sequence import RequestError
from policies.registry import policy_for
from cluster.generation import assemble, merged_generation_config, pad_token_id, sampling_params, token_list, unpad


class InjectedModelForCausalLM(nn.Module):
    main_input_name = "input_ids"
    input_modalities = ("text",)
    output_modalities = ("text",)

    def __init__(self, backend, hf_config, generation_config: GenerationConfig | None, dtype: torch.dtype):
        super().__init__()
        self.backend = backend
        self.model = getattr(backend, "model", None)     # the local injected model, when there is one
        self.config = hf_config
        self.generation_config = generation_config or GenerationConfig.from_model_config(hf_config)
        self._dtype = dtype
        self.positions_from_mask = policy_for(hf_config).positions_from_mask

    @property
    def device(self) -> torch.device:
        return getattr(self.backend, "device", torch.device("cpu"))

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def can_generate(self) -> bool:
        return True

    def _offsets(self, input_ids, attention_mask, position_ids) -> list[int]:
        """First position of each row's real tokens: HF's default positions are the column indices
        (OPT's count from the first real token instead)."""
        if attention_mask is None or (position_ids is None and self.positions_from_mask):
            first = [0] * len(input_ids)
        else:
            first = [int(m.nonzero()[0]) if m.any() else 0 for m in attention_mask]
        if position_ids is None:
            return first
        position_ids = position_ids.expand(len(input_ids), -1)
        return [int(pos[f]) for pos, f in zip(position_ids, first)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                past_key_values=None, return_dict: bool = True, **kwargs):
        """logits [batch, seq, vocab] (fp32); masked positions hold zeros."""
        if past_key_values is not None:
            raise RequestError("past_key_values is not supported: the engine keeps its own KV cache; "
                               "use generate()")
        rows = unpad(input_ids, attention_mask)
        if any(not r for r in rows):
            raise RequestError("a row of attention_mask masks every token")
        per_row = self.backend.forward_logits(rows, self._offsets(input_ids, attention_mask, position_ids))
        logits = torch.zeros(*input_ids.shape, per_row[0].shape[-1], dtype=torch.float32, device=input_ids.device)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        for b, row_logits in enumerate(per_row):
            logits[b, mask[b]] = row_logits.to(logits.device)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        if not return_dict:
            return (logits,) if loss is None else (loss, logits)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 generation_config: GenerationConfig | None = None, **kwargs) -> torch.Tensor:
        """HF `generate` on the engine: returns [batch * num_return_sequences, prompt + new] token ids."""
        if input_ids is None:
            raise RequestError("generate() needs input_ids (an empty prompt has nothing to condition on)")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        config = merged_generation_config(self.generation_config, generation_config, kwargs)
        pad = pad_token_id(config)
        if attention_mask is None and config.pad_token_id is not None and pad not in token_list(config.eos_token_id):
            attention_mask = (input_ids != pad).long()       # as generate() infers it
        params = sampling_params(config, input_ids.shape[1])
        results = self.backend.generate(unpad(input_ids, attention_mask), params)
        return assemble(input_ids, results, pad)
