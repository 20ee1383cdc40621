"""The one-kernel sampler (Gumbel-max) against the distribution it must draw from (TRITON_INTERPRET=1
on CPU): the softmax of logits / temperature over the tokens at or above the row's floor."""
import pytest
import torch

from kernels.sampling import gumbel_pick

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])


@pytest.mark.parametrize("temperature, floor, allowed", [(1.0, float("-inf"), [0, 1, 2, 3, 4]), (0.5, 0.5, [0, 1, 2])])
def test_draws_follow_the_softmax_above_the_floor(temperature, floor, allowed):
    """600 rows of one distribution (a fixed seed: the draws, and so the test, are deterministic);
    frequencies within 0.06 of the probabilities (3 standard deviations), none outside the allowed
    tokens. (The interpreter takes ~25 ms a row.)"""
    rows = 600
    probs = torch.zeros(5)
    probs[allowed] = (LOGITS[allowed] / temperature).softmax(-1)
    drawn = gumbel_pick(LOGITS.repeat(rows, 1), torch.full((rows,), temperature), torch.full((rows,), floor), 1234)
    assert drawn.dtype == torch.int64 and set(drawn.tolist()) <= set(allowed)
    torch.testing.assert_close(torch.bincount(drawn, minlength=5).double() / rows, probs.double(), atol=0.06, rtol=0)


def test_the_seed_fixes_the_draws_and_rows_draw_apart():
    logits = torch.randn(32, 300, generator=torch.Generator().manual_seed(0))
    t, f = torch.ones(32), torch.full((32,), float("-inf"))
    a, b, c = gumbel_pick(logits, t, f, 5), gumbel_pick(logits, t, f, 5), gumbel_pick(logits, t, f, 6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    same = gumbel_pick(torch.zeros(32, 300), t, f, 5)                  # one distribution in every row
    assert len(set(same.tolist())) > 25


def test_a_tiny_temperature_is_greedy_and_vocabularies_span_blocks():
    """A vocabulary of 5,000 spans two 4,096-wide blocks: the winner may sit in either."""
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(1))
    logits[3, 4500] = 50.0
    got = gumbel_pick(logits, torch.full((6,), 1e-3), torch.full((6,), float("-inf")), 9)
    assert torch.equal(got, logits.argmax(-1))
