"""What `generate` returns: plain data, the same from a local engine and from a TP group."""
from dataclasses import dataclass, field

from actors.sequence import Sequence


@dataclass
class CompletionOutput:
    index: int                      # sample number within its prompt (0 .. n-1)
    token_ids: list[int]            # generated tokens only
    finish_reason: str | None       # "stop" | "length" | "abort"
    text: str | None = None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt: str | None = None


def request_outputs(prompts: list[list[int]], groups: list[list[Sequence]], tokenizer=None,
                    texts: list[str] | None = None) -> list[RequestOutput]:
    results = []
    for i, (prompt, seqs) in enumerate(zip(prompts, groups)):
        outs = [CompletionOutput(j, s.output_token_ids, s.finish_reason,
                                 tokenizer.decode(s.output_token_ids, skip_special_tokens=True) if tokenizer else None)
                for j, s in enumerate(seqs)]
        results.append(RequestOutput(list(prompt), outs, texts[i] if texts else None))
    return results
