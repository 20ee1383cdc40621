"""Quantized inference end to end on tiny random models (CPU): int8 (per row, MoQ row groups, K-groups)
and int4 logits vs fp32 HF, the quantized model equals the float model with dequantized weights, every
accepted setting form, bad settings, weight bytes, the HF model not kept alive, TP=2 vs TP=1, and
pre-quantized save_mp_checkpoint_path round trips.

Measured on these models (max |err| / max |logit| vs fp32 HF, 3 x 40 tokens): int8 0.031-0.048,
int4 (group 32/64) 0.40-0.52; top-1 agreement int8 >= 0.93, int4 0.50-0.61. Random tiny models have
near-tied logits, so greedy generations drift apart early (32 tokens x 4 prompts agree 44-82% for int8).
"""
import gc
import weakref

import pytest
import torch

import rayspeed
from actors.loader import CheckpointError
from actors.sharded_checkpoint import open_any
from kernels.quant import dequantize
from tests.helpers import tiny_model

INJECT = dict(replace_with_kernel_inject=True)
SETTINGS = {
    "int8 per row": dict(dtype=torch.int8),
    "int8 MoQ (groups, extra)": dict(dtype=torch.int8, quantization_setting=(2, True)),
    "int8 K-groups": dict(dtype=torch.int8, quant={"enabled": True, "weight": {"num_bits": 8, "group_size": 32}}),
    "int4": dict(dtype="int4", quant={"weight": {"group_size": 32}}),
}
BOUNDS = {"int8": (0.08, 0.9), "int4": (0.8, 0.4)}        # (max rel err of logits, top-1 agreement)


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def inputs():
    return torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=["gpt_neo", "llama"])
def hf(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("setting", SETTINGS)
def test_logits_close_to_fp32_and_equal_to_the_dequantized_model(hf, setting):
    ids = inputs()
    with torch.no_grad():
        expected = hf(ids).logits
    engine = rayspeed.init_inference(hf, **INJECT, **SETTINGS[setting])
    got = engine.module(ids).logits
    max_err, top1 = BOUNDS[setting[:4]]
    assert rel_err(got, expected) < max_err
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= top1
    assert engine.module.dtype == torch.float32                       # CPU compute dtype
    float_engine = rayspeed.init_inference(hf, dtype=torch.float32, **INJECT)
    _load_dequantized(float_engine.backend.model, engine.backend.model)
    assert rel_err(got, float_engine.module(ids).logits) < 1e-5       # only the weights' rounding differs


def _load_dequantized(float_model, quantized_model) -> None:
    params = dict(float_model.named_parameters())
    for name, module in quantized_model.named_modules():
        if hasattr(module, "qweight"):
            w = dequantize(module.qweight, module.scales, module.quant.bits, module.group_size)
            params[f"{name}.weight"].data.copy_(w)


def test_only_block_linears_are_quantized_and_weight_bytes_shrink(hf):
    def linear_bytes(engine):
        return sum(p.numel() * p.element_size() for n, p in engine.backend.model.named_parameters()
                   if n.startswith("layers.") and n.rsplit(".", 1)[1] in ("weight", "qweight", "scales")
                   and "norm" not in n)

    fp16 = linear_bytes(rayspeed.init_inference(hf, dtype=torch.float16, device="cpu", **INJECT))
    int8 = rayspeed.init_inference(hf, **INJECT, **SETTINGS["int8 per row"])
    int4 = rayspeed.init_inference(hf, dtype="int4", quant={"weight": {"group_size": 64}}, **INJECT)
    assert linear_bytes(int8) <= 0.55 * fp16                    # measured 0.53 (fp32 scales on CPU)
    assert linear_bytes(int4) <= 0.30 * fp16                    # measured 0.28
    model = int8.backend.model
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if n.endswith("qweight")} == {torch.int8}
    assert not any(n.endswith("qkv.weight") or n.endswith("down.weight") for n in dtypes)
    assert model.embed.weight.dtype == torch.float32 and model.layers[0].attn_norm.weight.dtype == torch.float32
    assert {p.dtype for n, p in int4.backend.model.named_parameters() if n.endswith("qweight")} == {torch.uint8}


def test_the_engine_keeps_no_reference_to_the_hf_model():
    model = tiny_model("gpt2")
    engine = rayspeed.init_inference(model, dtype=torch.int8, **INJECT)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None                     # its float weights are freed once the caller drops it
    assert engine.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True)[0].outputs[0].token_ids


@pytest.mark.parametrize("setting, spec", [
    (dict(quantization_setting=4), (8, None, 4, False)),
    (dict(quantization_setting=(4, True)), (8, None, 4, True)),
    (dict(quantization_setting=(True, 4)), (8, None, 4, True)),                 # DeepSpeed's own order
    (dict(quant={"enabled": True, "weight": {"num_bits": 8, "q_groups": 2, "q_type": "symmetric"},
                 "activation": {"enabled": False}, "qkv": {"enabled": True}}), (8, None, 2, False)),
    (dict(quant={"weight": {"num_bits": 4}}), (4, 128, None, False)),
    (dict(dtype="int4"), (4, 128, None, False)),
])
def test_accepted_setting_forms(setting, spec):
    config = rayspeed.InferenceConfig(**{"dtype": torch.int8, **setting})
    quant = config.weight_quant()
    assert (quant.bits, quant.group_size, quant.row_groups, quant.mlp_extra_grouping) == spec
    assert config.compute_dtype("cpu") == torch.float32 and config.compute_dtype("cuda") == torch.float16


@pytest.mark.parametrize("kw, match", [
    (dict(dtype=torch.float16, quantization_setting=2), "quantization_setting.*needs dtype=torch.int8"),
    (dict(dtype=torch.int8, quantization_setting=0), "quantization_setting.*groups must be >= 1"),
    (dict(dtype=torch.int8, quantization_setting=(True, False)), "quantization_setting"),
    (dict(dtype=torch.int8, quant={"weight": {"q_bits": 8}}), "quant.weight.q_bits"),
    (dict(dtype=torch.int8, quant={"activation": {"enabled": True}}), "quant.activation.enabled"),
    (dict(dtype="int4", quantization_setting=2), "MoQ row groups are for int8"),
    (dict(dtype=torch.int8), "replace_with_kernel_inject=True"),             # no kernel injection
])
def test_bad_settings_are_config_errors_naming_the_field(kw, match):
    inject = {} if match.startswith("replace") else INJECT
    with pytest.raises(rayspeed.ConfigError, match=match):
        rayspeed.init_inference(tiny_model("gpt2"), **inject, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(dtype=torch.int8, quantization_setting=3), r"layer 0: QKVParallelLinear: quantize_groups=3 does not "
                                                     r"divide the 64 output rows"),
    (dict(dtype="int4"), r"group_size=128 does not divide this rank's 64 input features"),
])
def test_groups_that_do_not_divide_fail_before_loading(kw, match):
    with pytest.raises(ValueError, match=match):
        rayspeed.init_inference(tiny_model("llama"), **INJECT, **kw)


@pytest.mark.parametrize("setting", ["int8 MoQ (groups, extra)", "int4"])
def test_pre_quantized_checkpoint_round_trip(tmp_path, setting):
    hf, ids = tiny_model("llama"), inputs()
    engine = rayspeed.init_inference(hf, save_mp_checkpoint_path=str(tmp_path), **INJECT, **SETTINGS[setting])
    description = str(tmp_path / "ds_inference_config.json")
    reloaded = rayspeed.init_inference(checkpoint=description, **INJECT, **SETTINGS[setting])
    assert torch.equal(reloaded.module(ids).logits, engine.module(ids).logits)      # bit for bit
    with pytest.raises(CheckpointError, match="quantized with .*pass the dtype and quantization settings"):
        rayspeed.init_inference(checkpoint=description, dtype=torch.float32, **INJECT)
    with pytest.raises(CheckpointError, match="saved at tensor-parallel degree 1 loads only at tp_size=1"):
        list(open_any(description, None, rank=0, tp_size=2).tensors())


def test_float_sharded_checkpoint_quantizes_on_load(tmp_path):
    hf, ids = tiny_model("llama"), inputs()
    rayspeed.init_inference(hf, dtype=torch.float32, save_mp_checkpoint_path=str(tmp_path), **INJECT)
    direct = rayspeed.init_inference(hf, dtype=torch.int8, **INJECT)
    loaded = rayspeed.init_inference(checkpoint=str(tmp_path / "ds_inference_config.json"), dtype=torch.int8,
                                     **INJECT)
    assert torch.equal(loaded.module(ids).logits, direct.module(ids).logits)


HEAD = {"int8": dict(dtype=torch.int8, quant={"lm_head": {"enabled": True}}),
        "int4": dict(dtype="int4", quant={"weight": {"group_size": 32}, "lm_head": {"enabled": True}})}


@pytest.mark.parametrize("bits", HEAD)
def test_quantized_lm_head(hf, bits):
    """quant.lm_head: the logits come from the head's quantized copy (padded rows, zeros past the vocab),
    for one row (the streaming path) and many; the float head and the blocks are unchanged."""
    ids = inputs()
    with torch.no_grad():
        expected = hf(ids).logits
    plain = rayspeed.init_inference(hf, **INJECT, **{**HEAD[bits], "quant": {**HEAD[bits]["quant"], "lm_head": {}}})
    engine = rayspeed.init_inference(hf, **INJECT, **HEAD[bits])
    model = engine.backend.model
    vocab, width = hf.config.vocab_size, model.spec.embed_dim
    assert model.head_qweight.shape == (-(-vocab // 64) * 64, width // (2 if bits == "int4" else 1))
    assert not model.head_qweight[vocab:].any() if bits == "int8" else (model.head_qweight[vocab:] == 0x88).all()
    assert not any("head_q" in n or "head_scales" in n for n in model.state_dict())     # never saved
    q = model.head_quant
    head = dequantize(model.head_qweight, model.head_scales, q.bits, q.k_group(width))[:vocab]
    for rows in (1, 40):
        h = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows))
        assert rel_err(model.compute_logits(h), h @ head.T) < 1e-5
    got = engine.module(ids).logits
    max_err, top1 = BOUNDS[bits]
    assert rel_err(got, expected) < max_err
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= top1
    assert 0 < rel_err(got, plain.module(ids).logits) < max_err                        # the head's rounding
    out = engine.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True)[0].outputs[0].token_ids
    assert len(out) == 4


def test_quantized_lm_head_needs_a_quantized_dtype_and_is_not_stored(tmp_path):
    with pytest.raises(rayspeed.ConfigError, match="quant quantizes weights: it needs dtype=torch.int8"):
        rayspeed.init_inference(tiny_model("gpt2"), dtype=torch.float16, quant={"lm_head": {"enabled": True}},
                                **INJECT)
    hf, ids = tiny_model("llama"), inputs()
    engine = rayspeed.init_inference(hf, save_mp_checkpoint_path=str(tmp_path), **INJECT, **HEAD["int8"])
    description = str(tmp_path / "ds_inference_config.json")
    reloaded = rayspeed.init_inference(checkpoint=description, **INJECT, **HEAD["int8"])
    assert torch.equal(reloaded.module(ids).logits, engine.module(ids).logits)          # rebuilt from the float head
    without = rayspeed.init_inference(checkpoint=description, dtype=torch.int8, **INJECT)   # same stored format
    assert without.backend.model.head_qweight is None


@pytest.mark.parametrize("family", ["gptj", "opt_post"])
def test_quantized_lm_head_with_a_bias_or_a_narrower_embedding(family):
    """GPT-J's head adds a bias (padded with the copy's rows); OPT-350m's multiplies the embedding
    width (48), after projecting the hidden state (64) down."""
    hf, ids = tiny_model(family), inputs()
    with torch.no_grad():
        expected = hf(ids).logits
    engine = rayspeed.init_inference(hf, **INJECT, **HEAD["int8"])
    model = engine.backend.model
    vocab, width = model.spec.vocab_size, model.spec.embed_dim
    assert (model.lm_head_bias if family == "gptj" else model.project_out) is not None
    head = dequantize(model.head_qweight, model.head_scales, 8, width)[:vocab]
    h = torch.randn(3, model.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    projected = h if model.project_out is None else h @ model.project_out.T
    bias = 0 if model.lm_head_bias is None else model.lm_head_bias
    assert rel_err(model.compute_logits(h), projected @ head.T + bias) < 1e-5
    assert rel_err(engine.module(ids).logits, expected) < BOUNDS["int8"][0]
