"""Next-token choice for a batch of sequences, each with its own `SamplingParams`.

Order as in HF `generate`: repetition penalty and the min-new-tokens stop mask on the raw
logits, then greedy argmax, or temperature -> top-k -> top-p -> a draw.

`sample_on_device` leaves the tokens on the logits' device and never waits for the GPU (the host's
parameters travel through pinned staging copies; unseeded draws race exponential noise instead of
calling multinomial), so a step's tokens can feed the next step before the host sees them
(run-ahead, actors/llm_engine.py) for sampled sequences as for greedy ones. A seeded request's noise
is a function of its seed and the index of the token drawn (kernels/sampling.py), computed on the
device like the rest. What needs the host stays out of that path (`picks_on_device`): the repetition
penalty reads the token history, the stop mask depends on the step, and log-probabilities
(`logprob_rows`, `token_logprobs`) are read by the host.
"""
import torch

from actors.model_runner import to_device
from actors.sequence import Sequence, TokenLogprobs
from kernels.argmax import argmax_rows
from kernels.sampling import draw_key, seeded_exponential


def stops_masked(seq: Sequence, ahead: int = 0) -> bool:
    """Whether the stop tokens are masked for the sequence's token `ahead` steps from now (min_new_tokens)."""
    return bool(seq.params.stop_token_ids) and seq.num_output_tokens + ahead < seq.params.min_new_tokens


def picks_on_device(seq: Sequence, ahead: int = 0) -> bool:
    """Whether `sample_on_device` picks the sequence's token `ahead` steps from now without the host:
    greedy or sampled (seeded or not), no repetition penalty, no stop mask, no log-probabilities."""
    p = seq.params
    return p.repetition_penalty == 1.0 and not stops_masked(seq, ahead) and p.logprobs is None


def logprob_rows(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor] | None:
    """The rows of the sequences that asked for log-probabilities and their log-softmax [rows, vocab]
    over the model's logits as they come (before any penalty, temperature or filter: what `sample`
    then changes in place is a copy's concern no longer); None when none asked."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not rows:
        return None
    return rows, logits[rows].float().log_softmax(dim=-1)


def token_logprobs(found: tuple[list[int], torch.Tensor], seqs: list[Sequence],
                   tokens: list[int]) -> dict[int, TokenLogprobs]:
    """Row -> the picked token's log-probability and the row's `logprobs` most likely tokens', from
    `logprob_rows`' result."""
    rows, lp = found
    scored = score_tokens(lp, [tokens[i] for i in rows], [seqs[i].params.logprobs for i in rows])
    return dict(zip(rows, scored))


def score_tokens(lp: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprobs]:
    """Per row of log-probabilities `lp` [rows, vocab]: its token's, and its k most likely tokens' (one
    copy to the host)."""
    picked = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None]).squeeze(1)
    top_lp, top_ids = lp.topk(max(ks), dim=-1)
    picked, top_lp, top_ids = picked.tolist(), top_lp.tolist(), top_ids.tolist()
    return [TokenLogprobs(token, picked[j], tuple(zip(top_ids[j][:k], top_lp[j][:k])))
            for j, (token, k) in enumerate(zip(tokens, ks))]


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


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities after temperature, top-k and top-p, over the candidate tokens, and which token each
    candidate is (None: all tokens, in vocabulary order). Candidates are the top max(top_k) tokens in
    descending order (`topk`, far cheaper than sorting the vocabulary) where every row has a top-k,
    all tokens sorted where top-p needs an order without one, all tokens unsorted where neither
    filter is set."""
    vocab, device = logits.shape[-1], logits.device
    ks = [min(s.params.top_k or vocab, vocab) for s in seqs]
    scaled = logits / to_device([s.params.temperature for s in seqs], torch.float32, device)[:, None]
    if max(ks) == vocab and all(s.params.top_p == 1.0 for s in seqs):
        return scaled.softmax(dim=-1), None
    if max(ks) < vocab:
        scaled, order = scaled.topk(max(ks), dim=-1)
    else:
        scaled, order = scaled.sort(dim=-1, descending=True)
    if min(ks) < scaled.shape[-1]:
        rank = torch.arange(scaled.shape[-1], device=device)
        scaled.masked_fill_(rank[None, :] >= to_device(ks, torch.int64, device)[:, None], float("-inf"))
    probs = scaled.softmax(dim=-1)
    if any(s.params.top_p < 1.0 for s in seqs):
        top_p = to_device([s.params.top_p for s in seqs], torch.float32, device)
        outside = probs.cumsum(dim=-1) - probs > top_p[:, None]       # keeps at least the top token
        probs = probs.masked_fill(outside, 0.0)
    return probs, order


def _draw(probs: torch.Tensor, seqs: list[Sequence], ahead: int) -> torch.Tensor:
    """One candidate index per row, in proportion to `probs` (rows need not sum to 1): exponential
    noise raced on the device (argmax of p / E, E ~ Exp(1), picks i with probability p_i). A seeded
    row's noise is that of its seed and the index of the token drawn (`ahead` past its last)."""
    seeded = [i for i, s in enumerate(seqs) if s.seed is not None]
    if len(seeded) == len(seqs):
        noise = seeded_exponential(_keys(seqs, ahead, probs.device), probs.shape[-1])
    else:
        noise = torch.empty_like(probs).exponential_()
        if seeded:
            noise[to_device(seeded, torch.int64, probs.device)] = \
                seeded_exponential(_keys([seqs[i] for i in seeded], ahead, probs.device), probs.shape[-1])
    return (probs / noise).argmax(dim=-1)


def _keys(seqs: list[Sequence], ahead: int, device: torch.device) -> torch.Tensor:
    return to_device([draw_key(s.seed, s.num_output_tokens + ahead) for s in seqs], torch.int64, device)


def warm_up(vocab_size: int, device: torch.device) -> None:
    """Build the sampling kernels now, at start-up: the first request to need one would otherwise wait
    for its compile (and the engine thread hold the GIL through it)."""
    argmax_rows(torch.zeros(2, vocab_size, device=device))
    seeded_exponential(to_device([1, 2], torch.int64, device), vocab_size)


def sample_on_device(logits: torch.Tensor, seqs: list[Sequence], ahead: int = 0) -> torch.Tensor:
    """logits: [seqs, vocab] fp32 (modified in place) -> one token id per sequence, int64 on the logits'
    device; waits for the GPU only for sequences `picks_on_device` excludes. `ahead`: the step is that
    many tokens past each sequence's last (run-ahead), which a seeded draw takes into account."""
    _penalize(logits, seqs)
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if not rows:
        return argmax_rows(logits)
    sampled = [seqs[i] for i in rows]
    every = len(rows) == len(seqs)
    index = None if every else to_device(rows, torch.int64, logits.device)
    probs, order = _filtered_probs(logits if every else logits[index], sampled)
    picks = _draw(probs, sampled, ahead)
    if order is not None:
        picks = order.gather(1, picks[:, None]).squeeze(1)
    if every:                                     # no greedy row: no argmax
        return picks
    return argmax_rows(logits).index_copy_(0, index, picks)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [seqs, vocab] fp32 (modified in place) -> one token id per sequence, on the host."""
    return sample_on_device(logits, seqs).tolist()
