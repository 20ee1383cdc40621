"""Next-token choice for a batch of sequences, each with its own `SamplingParams`.

Order as in HF `generate`: repetition penalty and the min-new-tokens stop mask on the raw
logits, then greedy argmax, or temperature -> top-k -> top-p -> multinomial draw.
"""
import torch

from actors.sequence import Sequence


def stops_masked(seq: Sequence, ahead: int = 0) -> bool:
    """Whether the stop tokens are masked for the sequence's token `ahead` steps from now (min_new_tokens)."""
    return bool(seq.params.stop_token_ids) and seq.num_output_tokens + ahead < seq.params.min_new_tokens


def is_plain_argmax(seq: Sequence, ahead: int = 0) -> bool:
    """Whether `sample` picks the sequence's token `ahead` steps from now as the bare argmax of its
    logits (greedy, no penalty, no stop mask): a choice the GPU makes without the host."""
    p = seq.params
    return p.greedy and p.repetition_penalty == 1.0 and not stops_masked(seq, ahead)


def _penalize(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            scores = logits[row, seen]
            logits[row, seen] = torch.where(scores > 0, scores / p.repetition_penalty,
                                            scores * p.repetition_penalty)
        if stops_masked(seq):
            logits[row, list(p.stop_token_ids)] = float("-inf")


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities over tokens sorted by logit (descending), after top-k and top-p; and the sort order."""
    temps = torch.tensor([s.params.temperature for s in seqs], device=logits.device)
    sorted_logits, order = (logits / temps[:, None]).sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    top_k = torch.tensor([s.params.top_k or logits.shape[-1] for s in seqs], device=logits.device)
    sorted_logits.masked_fill_(rank[None, :] >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([s.params.top_p for s in seqs], device=logits.device)
    outside = probs.cumsum(dim=-1) - probs > top_p[:, None]       # keeps at least the top token
    probs = probs.masked_fill(outside, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True), order


def _draw(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    seeded = [i for i, s in enumerate(seqs) if s.generator is not None]
    if not seeded:
        return torch.multinomial(probs, 1).squeeze(1)
    picks = torch.empty(len(seqs), dtype=torch.long, device=probs.device)
    for i, seq in enumerate(seqs):
        picks[i] = torch.multinomial(probs[i].cpu(), 1, generator=seq.generator).item() \
            if seq.generator is not None else torch.multinomial(probs[i], 1).item()
    return picks


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [seqs, vocab] fp32 (modified in place) -> one token id per sequence."""
    _penalize(logits, seqs)
    tokens = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        sampled_seqs = [seqs[i] for i in rows]
        probs, order = _filtered_probs(logits[index], sampled_seqs)
        picks = _draw(probs, sampled_seqs)
        tokens[index] = order.gather(1, picks[:, None]).squeeze(1)
    return tokens.tolist()
