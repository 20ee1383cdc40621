"""The seed's T5 AutoTP example (`injection_policy={T5Block: (...)}`) run by the `rayspeed` launcher
on 2 ranks of the session's Ray cluster: each rank shards the HF T5 in place, and the greedy output
printed on both ranks equals the unsharded model's."""
import pytest
import torch
import transformers as tf

from tests.cluster.test_launcher import lines_of
from tests.cluster.test_launcher import rayspeed as launch
from tests.helpers import byte_tokenizer

PROMPT = "DeepSpeed is"

SCRIPT = """
    # The seed's T5 example, but for the import, a tiny offline model and `Text2Text` standing in for
    # pipeline("text2text-generation"), which transformers 5 removed.
    import os
    import torch
    import rayspeed
    from transformers.models.t5.modeling_t5 import T5Block
    from tests.cluster.test_auto_tp_launch import PROMPT, Text2Text, tiny_t5
    from tests.helpers import byte_tokenizer

    local_rank = int(os.getenv("LOCAL_RANK", "0"))
    world_size = int(os.getenv("WORLD_SIZE", "1"))
    policies = {"class": {T5Block: ("SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo")},
                "name": {"T5Block": ("SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo")},
                "auto": None}
    for how, policy in policies.items():
        pipe = Text2Text(tiny_t5(), byte_tokenizer())
        torch.manual_seed(100 + local_rank)      # the ranks' RNGs differ until init_inference
        pipe.model = rayspeed.init_inference(pipe.model, tensor_parallel={"tp_size": world_size},
                                             dtype=torch.float, injection_policy=policy).module
        print("greedy", how, repr(pipe(PROMPT, do_sample=False, max_new_tokens=16)[0]))
    print("sampled", repr(pipe(PROMPT, do_sample=True, top_k=0, max_new_tokens=16)[0]))
"""


def tiny_t5(seed: int = 0) -> tf.T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = tf.T5Config(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                         initializer_factor=8.0)     # HF's default (1.0) makes a tiny T5 repeat one token
    return tf.T5ForConditionalGeneration(config).eval()


class Text2Text:
    """What transformers 4's `pipeline("text2text-generation")` did: encode, `model.generate`, decode.
    `model` is an attribute, so the seed's `pipe.model = engine.module` works."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, text: str, **generate_kwargs) -> list[dict]:
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"].to(self.model.device)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **generate_kwargs)[0]
        return [{"generated_text": self.tokenizer.decode(out, skip_special_tokens=True),
                 "generated_token_ids": out.tolist()}]


@pytest.fixture(scope="module")
def launched(ray_cluster, tmp_path_factory):
    result = launch(ray_cluster, tmp_path_factory.mktemp("auto_tp"), SCRIPT, "--num_gpus", "2", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("how", ["class", "name", "auto"])
def test_seed_t5_example_on_two_ranks_matches_one(launched, how):
    expected = Text2Text(tiny_t5(), byte_tokenizer())(PROMPT, do_sample=False, max_new_tokens=16)[0]
    assert len(expected["generated_token_ids"]) > 4
    for rank in (0, 1):
        assert [line.split(" ", 1)[1] for line in lines_of(launched, rank, "greedy")
                if line.startswith(how + " ")] == [repr(expected)]


def test_sampling_agrees_across_ranks(launched):
    assert lines_of(launched, 0, "sampled") == lines_of(launched, 1, "sampled") != []
