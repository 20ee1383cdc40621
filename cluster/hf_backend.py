"""A backend over an unmodified HF model (`replace_with_kernel_inject=False`): `engine.generate`
keeps its contract while HF's own `generate` does the work."""
import torch

from actors.outputs import CompletionOutput, RequestOutput
from actors.sampler import score_tokens
from actors.sequence import SamplingParams


class HFBackend:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device

    def _hf_kwargs(self, p: SamplingParams) -> dict:
        kwargs = dict(max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens,
                      do_sample=not p.greedy, num_return_sequences=p.n, repetition_penalty=p.repetition_penalty,
                      eos_token_id=list(p.stop_token_ids) or None)
        if not p.greedy:
            kwargs.update(temperature=p.temperature, top_k=p.top_k or None, top_p=p.top_p)
        return kwargs

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        results = []
        for prompt in prompts:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            ids = torch.tensor([prompt], device=self.device)
            scored = params.logprobs is not None          # then HF returns each step's raw logits too
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=scored,
                                      output_logits=scored, **self._hf_kwargs(params))
            result = RequestOutput(list(prompt))
            for j, row in enumerate((out.sequences if scored else out).tolist()):
                # decoder-only output repeats the prompt; encoder-decoder output starts with the decoder start token
                new = row[1:] if self.model.config.is_encoder_decoder else row[len(prompt):]
                stops = [i for i, t in enumerate(new) if t in params.stop_token_ids]
                new = new[:stops[0] + 1] if stops else new
                logprobs = None
                if scored:                                 # out.logits: a [samples, vocab] tensor per step
                    lp = torch.stack([step[j] for step in out.logits[:len(new)]]).float().log_softmax(dim=-1)
                    logprobs = score_tokens(lp, new, [params.logprobs] * len(new))
                result.outputs.append(CompletionOutput(j, new, "stop" if stops else "length", logprobs=logprobs))
            results.append(result)
        return results

    def forward_logits(self, prompts: list[list[int]], position_offsets: list[int]) -> list[torch.Tensor]:
        raise NotImplementedError("the unmodified HF model is engine.module itself: call it directly")
