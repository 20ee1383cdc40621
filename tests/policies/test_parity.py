"""Every policy against HF on the same random weights: fp32 logits within 1e-4 relative error,
and greedy generation token for token."""
import pytest
import torch

import rayspeed
from tests.helpers import CONFIGS, PAD, tiny_model

FAMILIES = sorted(CONFIGS)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    hf = tiny_model(request.param)
    engine = rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=True)
    return request.param, hf, engine


@pytest.mark.parametrize("length", [1, 7, 33, 100])
def test_logits_match_hf(pair, length):
    _, hf, engine = pair
    ids = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = hf(ids).logits
    assert rel_err(engine.module(ids).logits, expected) < 1e-4


def test_left_padded_batch_logits_match_hf(pair):
    _, hf, engine = pair
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    mask[1, :3] = 0
    ids[mask == 0] = PAD
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
    got = engine.module(ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_err(got[real], expected[real]) < 1e-4
    assert (got[~real] == 0).all()


def test_greedy_64_tokens_match_hf_generate(pair):
    _, hf, engine = pair
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                  # left padding inside the batch
    ids[mask == 0] = PAD
    kwargs = dict(attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    expected = hf.generate(ids, **kwargs)
    got = engine.module.generate(ids, **kwargs)
    assert got.shape == expected.shape == (3, 12 + 64)
    assert torch.equal(got, expected)


def test_fast_path_matches_drop_in(pair):
    _, hf, engine = pair
    prompts = [[5, 6, 7, 8], list(range(40, 70))]
    out = engine.generate(prompts, max_new_tokens=20, min_new_tokens=20, ignore_eos=True)   # EOS masked, as in HF
    for prompt, result in zip(prompts, out):
        ids = torch.tensor([prompt])
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                               do_sample=False)[0, len(prompt):]
        assert result.outputs[0].token_ids == expected.tolist()
        assert result.outputs[0].finish_reason == "length"
