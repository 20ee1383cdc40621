import pytest
import torch

from actors.sampler import sample, sample_on_device
from actors.sequence import RequestError, SamplingParams, Sequence


def seqs(n: int, **params) -> list[Sequence]:
    out = []
    for _ in range(n):
        s = Sequence([1, 2, 3], SamplingParams(**params))
        s.seed = s.params.seed                          # as the engine sets it for the first sample
        out.append(s)
    return out


def seeded(seeds, **params) -> list[Sequence]:
    return [s for seed in seeds for s in seqs(1, do_sample=True, seed=seed, **params)]


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert sample(logits.clone(), seqs(4)) == logits.argmax(-1).tolist()


def test_top_k_1_equals_greedy():
    logits = torch.randn(8, 50)
    assert sample(logits.clone(), seqs(8, do_sample=True, top_k=1)) == logits.argmax(-1).tolist()


def test_tiny_top_p_equals_greedy():
    logits = torch.randn(8, 50)
    assert sample(logits.clone(), seqs(8, do_sample=True, top_p=1e-6)) == logits.argmax(-1).tolist()


def test_top_k_keeps_draws_inside_the_top_k():
    logits = torch.randn(1, 50).repeat(200, 1)
    allowed = set(logits[0].topk(3).indices.tolist())
    assert set(sample(logits.clone(), seqs(200, do_sample=True, top_k=3))) <= allowed


@pytest.mark.parametrize("params, allowed", [(dict(), 4), (dict(top_k=2), 2), (dict(top_p=0.8), 2),
                                             (dict(temperature=0.5, top_k=3, top_p=0.9), 2)])
def test_draws_follow_the_filtered_softmax(params, allowed):
    """The unseeded draw (exponential noise raced on the device) picks each token with its probability
    after temperature, top-k and top-p: 40,000 rows of one distribution, frequencies within 0.015."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    p = SamplingParams(do_sample=True, **params)
    probs = (logits[0] / p.temperature).softmax(-1)
    probs[allowed:] = 0.0
    probs = probs / probs.sum()
    rows = 40_000
    drawn = sample_on_device(logits.repeat(rows, 1), seqs(rows, do_sample=True, **params))
    freq = torch.bincount(drawn, minlength=4).double() / rows
    torch.testing.assert_close(freq, probs.double(), atol=0.015, rtol=0)


def test_mixed_batch_keeps_greedy_rows_and_samples_the_rest():
    logits = torch.randn(6, 50)
    batch = seqs(3) + seqs(3, do_sample=True, top_k=1)
    batch.insert(1, batch.pop(4))                          # greedy, sampled, greedy, greedy, sampled, sampled
    assert sample(logits.clone(), batch) == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(1, 1000)
    a = sample(logits.clone().repeat(16, 1), seqs(16, do_sample=True, seed=7, temperature=5.0))
    b = sample(logits.clone().repeat(16, 1), seqs(16, do_sample=True, seed=7, temperature=5.0))
    c = sample(logits.clone().repeat(16, 1), seqs(16, do_sample=True, seed=8, temperature=5.0))
    assert a == b and a != c


@pytest.mark.parametrize("params, allowed", [(dict(), 4), (dict(top_k=2), 2), (dict(top_p=0.8), 2)])
def test_seeded_draws_follow_the_filtered_softmax(params, allowed):
    """40,000 rows of one distribution, each with its own seed: frequencies within 0.015."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    probs = logits[0].softmax(-1)
    probs[allowed:] = 0.0
    probs = probs / probs.sum()
    rows = 40_000
    drawn = sample_on_device(logits.repeat(rows, 1), seeded(range(rows), **params))
    freq = torch.bincount(drawn, minlength=4).double() / rows
    torch.testing.assert_close(freq, probs.double(), atol=0.015, rtol=0)


def test_a_seeded_draw_depends_on_its_seed_and_index_only():
    """The same seed and token index give the same token alone, at another row of a batch, beside
    unseeded and greedy rows; the next index (`ahead`, or after a token) gives another draw."""
    logits = torch.randn(1, 1000)
    hot = lambda rows: logits.clone().repeat(rows, 1) * 0.01                 # noqa: E731  (nearly uniform)
    alone = sample(hot(1), seeded([7]))
    batch = seqs(2, do_sample=True) + seqs(1) + seeded([9, 7])
    assert sample(hot(5), batch)[4] == alone[0]
    following = [sample(hot(1), seeded([7]))[0]]
    later = seeded([7])[0]
    ahead = [sample_on_device(hot(1), [later], ahead=k).item() for k in range(1, 5)]
    for k in range(4):
        later.append(following[-1])
        following.append(sample(hot(1), [later])[0])
    assert following[0] == alone[0] and ahead == following[1:]
    assert len(set(following)) > 1                     # 1,000 near-equal tokens: five draws differ


def test_repetition_penalty_demotes_seen_tokens():
    logits = torch.zeros(1, 10)
    logits[0, 2], logits[0, 7] = 2.0, 1.5             # token 2 was seen (prompt [1, 2, 3])
    assert sample(logits.clone(), seqs(1, repetition_penalty=2.0)) == [7]


def test_min_new_tokens_masks_stop_tokens():
    logits = torch.zeros(1, 10)
    logits[0, 9] = 5.0
    assert sample(logits.clone(), seqs(1, stop_token_ids=(9,), min_new_tokens=1, max_new_tokens=4)) != [9]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=1.5), dict(top_p=0), dict(max_new_tokens=0),
                                 dict(min_new_tokens=5, max_new_tokens=2), dict(unknown=1)])
def test_bad_sampling_params_name_the_field(bad):
    with pytest.raises(RequestError, match=next(iter(bad)).split("_")[0]):
        SamplingParams.build(**bad)
