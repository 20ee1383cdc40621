"""The seed's T5 AutoTP example (`injection_policy={T5Block: (...)}`) run by the `rayspeed` launcher
on 2 ranks of the session's Ray cluster: each rank shards the HF T5 in place, and the greedy output
printed on both ranks equals the unsharded model's. One launch runs every variant (policy by class,
by name, inferred), sampling on both ranks, and `engine.generate` on an AutoTP GPT-2."""
import pytest
import torch

from tests.cluster.test_launcher import lines_of
from tests.cluster.test_launcher import rayspeed as launch
from tests.helpers import byte_tokenizer, tiny_model
from tests.policies.test_auto_tp import tiny_t5

PROMPT = "DeepSpeed is"

SCRIPT = """
    # The seed's T5 example, but for the import, a tiny offline model and `Text2Text` standing in for
    # pipeline("text2text-generation"), which transformers 5 removed.
    import os
    import torch
    import rayspeed
    from transformers.models.t5.modeling_t5 import T5Block
    from tests.cluster.test_auto_tp_launch import PROMPT, Text2Text
    from tests.helpers import byte_tokenizer, tiny_model
    from tests.policies.test_auto_tp import tiny_t5     # the seed's T5Config, weights drawn wider

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
    engine = rayspeed.init_inference(tiny_model("gpt2"), tensor_parallel={"tp_size": world_size}, dtype=torch.float)
    print("engine", engine.generate([[5, 6, 7, 8]], max_new_tokens=8, ignore_eos=True)[0].outputs[0].token_ids)
"""


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


def test_engine_generate_on_two_ranks_matches_hf(launched):
    expected = tiny_model("gpt2").generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8, min_new_tokens=8,
                                           do_sample=False)[0, 4:].tolist()
    assert lines_of(launched, 0, "engine") == lines_of(launched, 1, "engine") == [str(expected)]
