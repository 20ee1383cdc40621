"""GPT-NeoX / Pythia: rotate-half rotary on the first `partial_rotary_factor` (`rotary_pct`) of each
head, parallel residual with two LayerNorms (or sequential with `use_parallel_residual=False`), and a
fused `query_key_value` stored per head as [heads, 3, head_dim], regrouped to [q; k; v] on load."""
from kernels.spec import ModelSpec
from policies.base import Policy, WeightRule, heads_to_qkv, layer_rules
from policies.rope import rope_frequencies, rope_parameters


def spec(c) -> ModelSpec:
    head_dim = c.hidden_size // c.num_attention_heads
    inv_freq, scaling = rope_frequencies(c, head_dim, rope_parameters(c).get("partial_rotary_factor", 1.0))
    return ModelSpec(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, num_kv_heads=c.num_attention_heads, head_dim=head_dim,
        intermediate_size=c.intermediate_size, max_positions=c.max_position_embeddings, norm="layer",
        norm_eps=c.layer_norm_eps, activation=c.hidden_act, gated_mlp=False, positional="rotary",
        attn_scales=(head_dim ** -0.5,) * c.num_hidden_layers, attn_windows=(None,) * c.num_hidden_layers,
        qkv_bias=c.attention_bias, out_bias=c.attention_bias, mlp_bias=True,
        parallel_residual=c.use_parallel_residual, rotary_inv_freq=inv_freq, rotary_scaling=scaling,
        tie_word_embeddings=c.tie_word_embeddings)


POLICY = Policy(
    name="gpt_neox", model_types=("gpt_neox",), spec=spec, prefixes=("gpt_neox.",),
    rules=(
        WeightRule("gpt_neox.embed_in.weight", "embed.weight"),
        WeightRule("gpt_neox.final_layer_norm.weight", "norm.weight"),
        WeightRule("gpt_neox.final_layer_norm.bias", "norm.bias"),
        WeightRule("embed_out.weight", "lm_head"),              # checkpoints before transformers 5
        WeightRule("lm_head.weight", "lm_head"),
    ) + layer_rules("gpt_neox.layers", {
        "input_layernorm.weight": "attn_norm.weight", "input_layernorm.bias": "attn_norm.bias",
        "attention.query_key_value.weight": ("attn.qkv.weight", None, False, heads_to_qkv),
        "attention.query_key_value.bias": ("attn.qkv.bias", None, False, heads_to_qkv),
        "attention.dense.weight": "attn.out.weight", "attention.dense.bias": "attn.out.bias",
        "post_attention_layernorm.weight": "mlp_norm.weight", "post_attention_layernorm.bias": "mlp_norm.bias",
        "mlp.dense_h_to_4h.weight": "mlp.up.weight", "mlp.dense_h_to_4h.bias": "mlp.up.bias",
        "mlp.dense_4h_to_h.weight": "mlp.down.weight", "mlp.dense_4h_to_h.bias": "mlp.down.bias",
    }),
)
