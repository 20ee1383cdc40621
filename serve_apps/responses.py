"""The pieces of OpenAI's response shapes that are pure formatting (serve_apps/server.py builds the
responses): log-probabilities in the completions and chat shapes, and token usage."""
import itertools

from actors.sequence import SamplingParams

LOGPROB_FLOOR = -9999.0             # what a -inf log-probability reads as (JSON has no infinities)


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, logprobs: list, offset: int) -> tuple[dict, int]:
    """The completions shape of `TokenLogprobs` (token texts, their log-probabilities, the alternatives
    by text, text offsets: the tokens' own texts' lengths summed from `offset`) and the offset after them."""
    texts = [_token_text(tokenizer, t.token_id) for t in logprobs]
    ends = list(itertools.accumulate(map(len, texts), initial=offset))
    return {"tokens": texts, "token_logprobs": [max(t.logprob, LOGPROB_FLOOR) for t in logprobs],
            "top_logprobs": [{_token_text(tokenizer, i): max(lp, LOGPROB_FLOOR) for i, lp in t.top}
                             for t in logprobs],
            "text_offset": ends[:-1]}, ends[-1]


def chat_logprobs(tokenizer, logprobs: list) -> dict:
    """The chat shape: per token its text, log-probability and UTF-8 bytes, and the alternatives'."""
    def entry(token_id: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": max(logprob, LOGPROB_FLOOR), "bytes": list(text.encode())}
    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in logprobs]}


def empty_choices(prompts: list[list[int]], params: SamplingParams) -> tuple[list[str], list, list[int]]:
    """Texts, finish reasons and token counts of every (prompt, sample) choice, before any came."""
    size = len(prompts) * params.n
    return [""] * size, [None] * size, [0] * size


def usage(prompts: list[list[int]], params: SamplingParams, completion_tokens: list[int]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(completion_tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}
