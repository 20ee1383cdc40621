"""Phi (1, 1.5, 2): attention and MLP side by side on one LayerNorm, rotate-half rotary on the first
`partial_rotary_factor` of each head, biases everywhere, and an LM head with a bias."""
from kernels.spec import ModelSpec
from policies.base import Policy, WeightRule, layer_rules
from policies.rope import rope_frequencies, rope_parameters


def spec(c) -> ModelSpec:
    if c.qk_layernorm:
        raise ValueError("Phi with qk_layernorm=True (LayerNorm on queries and keys) is not supported")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    inv_freq, scaling = rope_frequencies(c, head_dim, rope_parameters(c).get("partial_rotary_factor", 1.0))
    return ModelSpec(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=head_dim, intermediate_size=c.intermediate_size, max_positions=c.max_position_embeddings,
        norm="layer", norm_eps=c.layer_norm_eps, activation=c.hidden_act, gated_mlp=False, positional="rotary",
        attn_scales=(head_dim ** -0.5,) * c.num_hidden_layers, attn_windows=(None,) * c.num_hidden_layers,
        qkv_bias=True, out_bias=True, mlp_bias=True, parallel_residual=True, shared_norm=True,
        lm_head_bias=True, rotary_inv_freq=inv_freq, rotary_scaling=scaling,
        tie_word_embeddings=c.tie_word_embeddings)


POLICY = Policy(
    name="phi", model_types=("phi",), spec=spec, prefixes=("model.",),
    rules=(
        WeightRule("model.embed_tokens.weight", "embed.weight"),
        WeightRule("model.final_layernorm.weight", "norm.weight"),
        WeightRule("model.final_layernorm.bias", "norm.bias"),
        WeightRule("lm_head.weight", "lm_head"),
        WeightRule("lm_head.bias", "lm_head_bias"),
    ) + layer_rules("model.layers", {
        "input_layernorm.weight": "attn_norm.weight", "input_layernorm.bias": "attn_norm.bias",
        **{f"self_attn.{p}_proj.{kind}": (f"attn.qkv.{kind}", p) for p in "qkv" for kind in ("weight", "bias")},
        "self_attn.dense.weight": "attn.out.weight", "self_attn.dense.bias": "attn.out.bias",
        "mlp.fc1.weight": "mlp.up.weight", "mlp.fc1.bias": "mlp.up.bias",
        "mlp.fc2.weight": "mlp.down.weight", "mlp.fc2.bias": "mlp.down.bias",
    }),
)
