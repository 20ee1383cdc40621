"""Bad input at the `init_inference` door and the request door: clear errors, no crash."""
import pytest
import torch
import transformers as tf

import rayspeed
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def engine():
    return rayspeed.init_inference(tiny_model("gpt2"), dtype=torch.float32, replace_with_kernel_inject=True)


def test_unknown_family_lists_supported_and_points_at_injection_policy():
    config = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, is_decoder=True)
    with pytest.raises(rayspeed.UnsupportedModelError, match="model_type='bert'.*gpt_neo.*llama.*injection_policy"):
        rayspeed.init_inference(tf.BertLMHeadModel(config), dtype=torch.float32, replace_with_kernel_inject=True)


def test_without_kernel_inject_the_hf_modules_run_as_they_are():
    hf = tiny_model("gpt2")
    engine = rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=False)
    assert engine.module is hf
    out = engine.generate([[1, 2, 3]], max_new_tokens=5, ignore_eos=True)
    expected = hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out[0].outputs[0].token_ids == expected[0, 3:].tolist()


@pytest.mark.parametrize("dtype", ["float64", torch.int16, 3])
def test_bad_dtype(dtype):
    with pytest.raises(rayspeed.ConfigError, match="dtype"):
        rayspeed.init_inference(tiny_model("gpt2"), dtype=dtype, replace_with_kernel_inject=True)


def test_int8_needs_kernel_injection():
    with pytest.raises(rayspeed.ConfigError, match="int8.*replace_with_kernel_inject=True"):
        rayspeed.init_inference(tiny_model("gpt2"), dtype=torch.int8)


def test_prompt_longer_than_max_positions(engine):
    too_long = [1] * 300                              # the tiny GPT-2 has 256 positions
    with pytest.raises(rayspeed.RequestError, match="300 tokens.*256"):
        engine.generate([too_long], max_new_tokens=1)
    with pytest.raises(rayspeed.RequestError, match="exceeds"):
        engine.module(torch.tensor([too_long]))
    with pytest.raises(rayspeed.RequestError, match="exceeds"):
        engine.generate([[1] * 250], max_new_tokens=10)


@pytest.mark.parametrize("prompts, match", [
    ([[]], "empty prompt"), ([], "non-empty"), ([[1, 2, 99999]], r"\[0, 320\)"),
    (["text"], "tokenizer"), ([[1], "a"], "all strings or all token-id lists"),
])
def test_bad_prompts(engine, prompts, match):
    with pytest.raises(rayspeed.RequestError, match=match):
        engine.generate(prompts, max_new_tokens=2)


def test_engine_keeps_working_after_errors(engine):
    with pytest.raises(rayspeed.RequestError):
        engine.generate([[1, 2]], max_new_tokens=0)
    assert len(engine.generate([[1, 2]], max_new_tokens=3, ignore_eos=True)[0].outputs[0].token_ids) == 3
    assert engine.backend.block_manager.num_used == 0


def test_engine_generate_on_an_encoder_decoder_model_returns_the_decoded_tokens():
    config = tf.T5Config(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=8.0)
    torch.manual_seed(0)
    t5 = tf.T5ForConditionalGeneration(config).eval()
    engine = rayspeed.init_inference(t5, dtype=torch.float32)
    out = engine.generate([[5, 6, 7, 8]], max_new_tokens=8, ignore_eos=True)[0].outputs[0].token_ids
    expected = t5.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out == expected[0, 1:].tolist()                # without the decoder start token


def test_a_kv_cache_too_large_to_allocate_names_the_option():
    """Checked against free memory before anything is allocated (no attempt at 10^12 blocks)."""
    with pytest.raises(ValueError, match=r"kv_cache_blocks=1000000000000 needs .* GiB on cpu, more than is free"):
        rayspeed.init_inference(tiny_model("gpt2"), dtype=torch.float32, replace_with_kernel_inject=True,
                                kv_cache_blocks=10**12)
