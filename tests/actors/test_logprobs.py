"""Log-probabilities of generated tokens (`SamplingParams.logprobs`): the model's distribution as HF
computes it, for the injected engine and the unmodified-HF backend, greedy and sampled, and the
same through the engine loop's stream as in whole results."""
import asyncio

import pytest
import torch

import rayspeed
from actors.engine_loop import EngineLoop
from actors.sequence import RequestError, SamplingParams
from tests.helpers import byte_tokenizer, tiny_model

PROMPTS = [[5, 17, 60, 3], list(range(30, 52))]


@pytest.fixture(scope="module")
def hf():
    return tiny_model("gpt_neo")


def hf_logprobs(hf, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """HF's log-softmax [len(tokens), vocab] at the positions that predicted `tokens` (fp32)."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(dim=-1)


def check_against_hf(hf, prompt, completion, k):
    ref = hf_logprobs(hf, prompt, completion.token_ids)
    assert len(completion.logprobs) == len(completion.token_ids)
    for step, (token, got) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert got.token_id == token
        assert abs(got.logprob - ref[step, token].item()) < 1e-4
        top_lp, top_ids = ref[step].topk(k)
        assert [i for i, _ in got.top] == top_ids.tolist()
        torch.testing.assert_close(torch.tensor([lp for _, lp in got.top]), top_lp, rtol=0, atol=1e-4)


@pytest.mark.parametrize("inject", [True, False])
def test_greedy_and_sampled_logprobs_match_hf(hf, inject):
    """Each generated token's log-probability and the top 3 (ids, descending) equal HF's log-softmax
    of the same sequence; greedy picks are the top token; sampled ones (n = 2) are scored the same."""
    engine = rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=inject,
                                     tokenizer=byte_tokenizer())
    greedy = engine.generate(PROMPTS, max_new_tokens=6, ignore_eos=True, logprobs=3)
    sampled = engine.generate(PROMPTS, max_new_tokens=6, ignore_eos=True, logprobs=3, do_sample=True,
                              temperature=1.5, top_k=20, seed=4, n=2)
    for prompt, g, s in zip(PROMPTS, greedy, sampled):
        check_against_hf(hf, prompt, g.outputs[0], 3)
        assert all(lp.top[0][0] == lp.token_id for lp in g.outputs[0].logprobs)
        for completion in s.outputs:
            check_against_hf(hf, prompt, completion, 3)
    plain = engine.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
    assert plain[0].outputs[0].logprobs is None
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in greedy]


def test_zero_alternatives_still_score_the_picked_token(hf):
    engine = rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=True)
    out = engine.generate(PROMPTS[:1], max_new_tokens=4, ignore_eos=True, logprobs=0)[0].outputs[0]
    assert len(out.logprobs) == 4 and all(lp.top == () and lp.logprob <= 0 for lp in out.logprobs)


def test_streamed_deltas_carry_the_same_logprobs(hf):
    engine = rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=True).backend
    loop = EngineLoop(engine)
    params = SamplingParams(max_new_tokens=7, ignore_eos=True, logprobs=2)

    async def run():
        whole = (await loop.generate([PROMPTS[1]], params))[0].outputs[0]
        streamed = []
        async for delta in loop.stream(PROMPTS[1], params):
            assert len(delta.logprobs) == len(delta.token_ids)
            streamed += delta.logprobs
        return whole, streamed

    try:
        whole, streamed = asyncio.run(run())
    finally:
        loop.shutdown()
    assert [lp.token_id for lp in streamed] == whole.token_ids
    assert [lp.logprob for lp in streamed] == pytest.approx([lp.logprob for lp in whole.logprobs], abs=1e-6)


def test_logprobs_out_of_range_are_refused():
    with pytest.raises(RequestError, match="logprobs"):
        SamplingParams.build(logprobs=21)
    with pytest.raises(RequestError, match="logprobs"):
        SamplingParams.build(logprobs=-1)
