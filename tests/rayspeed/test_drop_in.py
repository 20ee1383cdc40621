"""`engine.module` as an HF drop-in: transformers.pipeline, generate() arguments, clear refusals."""
import pytest
import torch
from transformers import pipeline

import rayspeed
from tests.helpers import PAD, byte_tokenizer, tiny_model


@pytest.fixture(scope="module", params=["gpt_neo", "llama"])
def setup(request):
    hf = tiny_model(request.param)
    tok = byte_tokenizer()
    engine = rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=True, tokenizer=tok)
    return hf, tok, engine


def test_pipeline_greedy_text_equals_hf_pipeline(setup):
    hf, tok, engine = setup
    prompts = ["DeepSpeed is", "Ray actors rendezvous through"]
    expected = pipeline("text-generation", model=hf, tokenizer=tok)(prompts, do_sample=False, max_new_tokens=24)
    pipe = pipeline("text-generation", model=hf, tokenizer=tok)
    pipe.model = engine.module
    got = pipe(prompts, do_sample=False, max_new_tokens=24)
    assert got == expected
    assert got[0][0]["generated_text"].startswith("DeepSpeed is")


def test_pipeline_sampling_with_min_length_as_in_the_seed(setup):
    hf, tok, engine = setup
    pipe = pipeline("text-generation", model=hf, tokenizer=tok)
    pipe.model = engine.module
    torch.manual_seed(0)
    out = pipe(["DeepSpeed is", "Ray"], do_sample=True, min_length=50, max_new_tokens=60)
    for prompt, result in zip(["DeepSpeed is", "Ray"], out):
        ids = tok(result[0]["generated_text"])["input_ids"]
        assert result[0]["generated_text"].startswith(prompt) and len(ids) >= 50


def test_generate_num_return_sequences_and_left_padding(setup):
    hf, tok, engine = setup
    batch = tok(["a", "a longer prompt"], return_tensors="pt", padding=True)
    out = engine.module.generate(**batch, do_sample=True, num_return_sequences=3, max_new_tokens=8,
                                 min_new_tokens=8, top_k=20, top_p=0.9, temperature=0.8, repetition_penalty=1.2)
    assert out.shape == (6, batch["input_ids"].shape[1] + 8)
    assert torch.equal(out[:3, :batch["input_ids"].shape[1]], batch["input_ids"][[0, 0, 0]])


def test_max_length_counts_the_prompt_like_hf(setup):
    hf, _, engine = setup
    ids = torch.randint(0, 256, (1, 5))
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_length=12, min_length=12)
    assert torch.equal(engine.module.generate(ids, max_length=12, min_length=12), expected)


def test_eos_then_padding_like_hf(setup):
    hf, _, engine = setup
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(5))
    free = engine.module.generate(ids, max_new_tokens=10, min_new_tokens=10)
    eos = int(free[0, 8])                             # row 0 stops at its 3rd new token
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(engine.module.generate(ids, **kwargs), hf.generate(ids, **kwargs))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_beams=2), "beam search"),
    (dict(output_scores=True, return_dict_in_generate=True), "not supported"),
    (dict(no_such_argument=1), "no_such_argument"),
])
def test_unsupported_generate_arguments_are_refused(setup, kwargs, match):
    _, _, engine = setup
    with pytest.raises(rayspeed.RequestError, match=match):
        engine.module.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, **kwargs)


def test_labels_give_hf_loss(setup):
    hf, _, engine = setup
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = hf(ids, labels=ids).loss
    assert torch.allclose(engine.module(ids, labels=ids).loss, expected, rtol=1e-4)
