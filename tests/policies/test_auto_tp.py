"""AutoTP against the unsharded HF model. The ranks of a TP group run as threads of the test process
(`ThreadGroup` sums their partial outputs where `AutoTPRowLinear.forward` all-reduces), so every family
is checked without process start-up; fp32 outputs must match within 1e-5 relative error and greedy
tokens exactly. Real gloo ranks run in tests/cluster/test_auto_tp_launch.py."""
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.models.t5.modeling_t5 import T5Block

import rayspeed
from kernels.linear import TensorParallel
from policies.auto_tp import AutoTPColumnLinear, AutoTPError, AutoTPRowLinear, shard_in_place
from tests.helpers import VOCAB, tiny_model

TP = 2
T5_POLICY = ("SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo")


class ThreadGroup:
    """Stands in for a process group: the ranks are threads, each all-reduce sums in rank order."""

    def __init__(self, size: int):
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list = [None] * size

    def all_reduce(self, rank: int, x: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = x.clone()
        self.barrier.wait()
        total = torch.stack(self.slots).sum(0)
        self.barrier.wait()                          # all have read the slots before the next write
        return x.copy_(total)


@dataclass(frozen=True)
class ThreadTP(TensorParallel):
    def all_reduce(self, x: torch.Tensor, op=None) -> torch.Tensor:
        return self.group.all_reduce(self.rank, x)


def on_ranks(fn, size: int = TP) -> list:
    """fn(tp) on every rank of a thread group, concurrently; a failing rank releases the others."""
    group = ThreadGroup(size)

    def rank(tp):
        try:
            return fn(tp)
        except BaseException:
            group.barrier.abort()
            raise
    with ThreadPoolExecutor(size) as pool:
        return [f.result() for f in [pool.submit(rank, ThreadTP(r, size, group)) for r in range(size)]]


def tiny_t5(seed: int = 0) -> tf.T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=8.0)
    return tf.T5ForConditionalGeneration(config).eval()


def tiny_encoder(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config_cls, model_cls = {"bert": (tf.BertConfig, tf.BertForMaskedLM),
                             "roberta": (tf.RobertaConfig, tf.RobertaForMaskedLM)}[family]
    config = config_cls(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        **{"intermediate_size": 128, "max_position_embeddings": 64, "initializer_range": 0.1,
                           **overrides})
    return model_cls(config).eval()


class ToyBlock(nn.Module):
    """A block AutoTP does not know: it needs injection_policy={ToyBlock: ("down",)}."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class ToyModel(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(ToyBlock() for _ in range(2))
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


DECODERS = ("gpt2", "gpt_neo", "llama", "mistral", "qwen2", "opt", "opt_post", "gptj", "gpt_neox", "gpt_neox_seq",
            "phi")
MODELS = {"t5": tiny_t5, "bert": lambda: tiny_encoder("bert"), "roberta": lambda: tiny_encoder("roberta"),
          "toy": ToyModel, **{f: (lambda f=f: tiny_model(f)) for f in DECODERS}}
# case -> (family, injection policy (None: inferred from the block structure), tp_size)
CASES = {**{family: (family, None, TP) for family in MODELS if family != "toy"},
         "toy block by policy": ("toy", {ToyBlock: ("down",)}, TP),
         "t5 policy by class": ("t5", {T5Block: T5_POLICY}, TP),
         "t5 policy by name": ("t5", {"T5Block": T5_POLICY}, TP),
         "llama tp4 (2 KV heads on 4 ranks)": ("llama", None, 4)}
ROWS = {"t5": 10, "gpt2": 6, "gpt_neo": 8, "llama": 6, "toy": 2}          # 2 per layer; T5: 2 + 3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def outputs(family: str, model: torch.nn.Module) -> dict:
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    if family == "t5":
        return {"logits": model(ids, decoder_input_ids=ids[:, :5]).logits,
                "tokens": model.generate(ids, max_new_tokens=8, do_sample=False).tolist()}
    if family in ("bert", "roberta"):
        return {"logits": model(ids).logits}
    if family == "toy":
        return {"logits": model(torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)))}
    mask = torch.ones_like(ids)
    return {"logits": model(ids, attention_mask=mask).logits,
            "tokens": model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                                     do_sample=False).tolist()}


@pytest.mark.parametrize("case", CASES)
def test_sharded_model_matches_unsharded(case):
    family, policy, tp_size = CASES[case]
    expected = outputs(family, MODELS[family]())
    models = [MODELS[family]() for _ in range(tp_size)]      # built here: threads share the global RNG

    def sharded(tp):
        model = shard_in_place(models[tp.rank], tp, policy)
        return outputs(family, model), sum(isinstance(m, AutoTPRowLinear) for m in model.modules())

    for got, rows in on_ranks(sharded, tp_size):
        assert rows == ROWS.get(family, 4)
        assert rel_err(got["logits"], expected["logits"]) < 1e-5
        assert got.get("tokens") == expected.get("tokens")


def test_fused_qkv_is_split_per_part_and_heads_per_rank():
    full = tiny_model("gpt2")
    qkv = full.transformer.h[0].attn.c_attn.weight.detach().t().clone()     # [3 * 64, 64]: q, k, v
    model = shard_in_place(tiny_model("gpt2"), TensorParallel(1, TP), None)
    attn = model.transformer.h[0].attn
    assert isinstance(attn.c_attn, AutoTPColumnLinear) and isinstance(attn.c_proj, AutoTPRowLinear)
    expected = torch.cat([qkv[32:64], qkv[96:128], qkv[160:192]])       # rank 1: heads 2, 3 of q, k and v
    assert torch.equal(attn.c_attn.weight, expected)
    assert (attn.num_heads, attn.split_size, attn.c_proj.weight.shape) == (2, 32, (64, 32))
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.shape == (VOCAB, 64)


def test_t5_heads_and_relative_bias_table_are_per_rank():
    model = shard_in_place(tiny_t5(), TensorParallel(0, TP), {"T5Block": T5_POLICY})
    attn = model.encoder.block[0].layer[0].SelfAttention
    assert (attn.n_heads, attn.inner_dim, attn.relative_attention_bias.weight.shape[1]) == (2, 32, 2)
    assert isinstance(model.encoder.block[1].layer[1].DenseReluDense.wi, AutoTPColumnLinear)


def test_unknown_architecture_asks_for_injection_policy():
    with pytest.raises(AutoTPError, match=r"of ToyModel .* injection_policy=\{ToyBlock: .*linears: up, down"):
        shard_in_place(ToyModel(), TensorParallel(0, TP), None)


def test_sharding_twice_is_refused():
    model = shard_in_place(ToyModel(), TensorParallel(0, TP), {ToyBlock: ("down",)})
    with pytest.raises(AutoTPError, match="already sharded"):
        shard_in_place(model, TensorParallel(0, TP), {ToyBlock: ("down",)})


def test_named_linear_that_does_not_exist_is_named():
    model = tiny_t5()
    with pytest.raises(AutoTPError, match="'DenseReluDense.w_out'.*its linears are: layer.0.SelfAttention.q"):
        shard_in_place(model, TensorParallel(0, TP), {T5Block: ("SelfAttention.o", "DenseReluDense.w_out")})
    assert not any(isinstance(m, (AutoTPRowLinear, AutoTPColumnLinear)) for m in model.modules())
    with pytest.raises(rayspeed.ConfigError, match="DenseReluDense.w_out"):
        rayspeed.init_inference(tiny_t5(), dtype=torch.float, injection_policy={T5Block: ("DenseReluDense.w_out",)})


def test_policy_for_a_block_the_model_lacks():
    with pytest.raises(AutoTPError, match="GPT2Block.*no such module.*T5Block"):
        shard_in_place(tiny_t5(), TensorParallel(0, TP), {"GPT2Block": ("c_proj",)})


def test_fewer_kv_heads_than_ranks_are_replicated():
    full = tiny_model("llama")                                              # 4 query heads over 2 KV heads
    k = full.model.layers[0].self_attn.k_proj.weight.detach().clone()       # [2 * 16, 64]
    q = full.model.layers[0].self_attn.q_proj.weight.detach().clone()
    attn = shard_in_place(tiny_model("llama"), TensorParallel(3, 4), None).model.layers[0].self_attn
    assert torch.equal(attn.k_proj.weight, k[16:32])                        # ranks 2, 3 share KV head 1
    assert torch.equal(attn.q_proj.weight, q[48:64])                        # query head 3 belongs to it
    assert attn.num_key_value_groups == 1


def tiny_llama_6_heads_3_kv() -> tf.LlamaForCausalLM:
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=1,
                                              num_attention_heads=6, num_key_value_heads=3, intermediate_size=64))


@pytest.mark.parametrize("build, tp_size, match", [
    (lambda: tiny_model("gpt2"), 3, "GPT2Block 'transformer.h.0': attn.c_attn: 4 heads of 16 do not split .*=3"),
    (tiny_llama_6_heads_3_kv, 2, "self_attn.k_proj: 3 heads of 16 do not split across tp_size=2, and tp_size is not"),
    (lambda: tiny_encoder("bert", intermediate_size=130), 4,
     r"BertLayer 'bert.encoder.layer.0': intermediate.dense: 130 output features \(column-parallel\) do not split"),
])
def test_sizes_that_do_not_split_are_named(build, tp_size, match):
    with pytest.raises(AutoTPError, match=match):
        shard_in_place(build(), TensorParallel(0, tp_size), None)


def test_tp_one_with_policy_returns_the_model_unchanged():
    model = tiny_t5()
    engine = rayspeed.init_inference(model, dtype=torch.float, injection_policy={T5Block: T5_POLICY})
    assert engine.module is model
    assert not any(isinstance(m, (AutoTPRowLinear, AutoTPColumnLinear)) for m in model.modules())


def test_tp_from_a_driver_without_launcher_says_how_to_launch():
    with pytest.raises(rayspeed.ConfigError, match="rayspeed --num_gpus 2 script.py"):
        rayspeed.init_inference(tiny_model("gpt2"), tensor_parallel={"tp_size": 2}, dtype=torch.float)


def test_policy_and_kernel_injection_exclude_each_other():
    with pytest.raises(rayspeed.ConfigError, match="exclude each other"):
        rayspeed.init_inference(tiny_model("gpt2"), replace_with_kernel_inject=True,
                                injection_policy={"GPT2Block": ("c_proj",)})
