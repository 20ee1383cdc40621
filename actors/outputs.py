"""What `generate` returns: plain data, the same from a local engine and from a TP group."""
from dataclasses import dataclass, field

from actors.sequence import Sequence, TokenLogprobs


@dataclass
class CompletionOutput:
    index: int                      # sample number within its prompt (0 .. n-1)
    token_ids: list[int]            # generated tokens only
    finish_reason: str | None       # "stop" | "length" | "abort"
    text: str | None = None
    logprobs: list[TokenLogprobs] | None = None     # per generated token, when the params asked


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt: str | None = None


def request_outputs(prompts: list[list[int]], groups: list[list[Sequence]]) -> list[RequestOutput]:
    return [RequestOutput(list(prompt), [CompletionOutput(j, s.output_token_ids, s.finish_reason,
                                                          logprobs=None if s.logprobs is None else list(s.logprobs))
                                         for j, s in enumerate(seqs)])
            for prompt, seqs in zip(prompts, groups)]


def add_text(outputs: list[RequestOutput], tokenizer, prompts: list[str] | None) -> list[RequestOutput]:
    """Decoded completions (and the prompt strings) for callers that gave text."""
    for i, out in enumerate(outputs):
        out.prompt = prompts[i] if prompts else None
        if tokenizer is not None:
            for c in out.outputs:
                c.text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
    return outputs
