"""BLOOM: ALiBi instead of positions, a LayerNorm right after the word embeddings, GELU (tanh) MLP,
and a fused `query_key_value` stored per head as [heads, 3, head_dim], regrouped to [q; k; v] on load."""
from kernels.spec import ModelSpec
from policies.base import Policy, WeightRule, heads_to_qkv, layer_rules

# BLOOM has no position limit of its own (ALiBi); the KV cache and the engine need one
MAX_POSITIONS = 2048


def spec(c) -> ModelSpec:
    if c.apply_residual_connection_post_layernorm:
        raise ValueError("BLOOM with apply_residual_connection_post_layernorm=True is not supported")
    head_dim = c.hidden_size // c.n_head
    return ModelSpec(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.n_layer, num_heads=c.n_head,
        num_kv_heads=c.n_head, head_dim=head_dim, intermediate_size=4 * c.hidden_size,
        max_positions=getattr(c, "seq_length", None) or MAX_POSITIONS, norm="layer",
        norm_eps=c.layer_norm_epsilon, activation="gelu_pytorch_tanh", gated_mlp=False, positional="alibi",
        attn_scales=(head_dim ** -0.5,) * c.n_layer, attn_windows=(None,) * c.n_layer,
        qkv_bias=True, out_bias=True, mlp_bias=True, embed_norm=True, tie_word_embeddings=c.tie_word_embeddings)


POLICY = Policy(
    name="bloom", model_types=("bloom",), spec=spec, prefixes=("transformer.",),
    rules=(
        WeightRule("transformer.word_embeddings.weight", "embed.weight"),
        WeightRule("transformer.word_embeddings_layernorm.weight", "embed_norm.weight"),
        WeightRule("transformer.word_embeddings_layernorm.bias", "embed_norm.bias"),
        WeightRule("transformer.ln_f.weight", "norm.weight"),
        WeightRule("transformer.ln_f.bias", "norm.bias"),
        WeightRule("lm_head.weight", "lm_head"),
    ) + layer_rules("transformer.h", {
        "input_layernorm.weight": "attn_norm.weight", "input_layernorm.bias": "attn_norm.bias",
        "self_attention.query_key_value.weight": ("attn.qkv.weight", None, False, heads_to_qkv),
        "self_attention.query_key_value.bias": ("attn.qkv.bias", None, False, heads_to_qkv),
        "self_attention.dense.weight": "attn.out.weight", "self_attention.dense.bias": "attn.out.bias",
        "post_attention_layernorm.weight": "mlp_norm.weight", "post_attention_layernorm.bias": "mlp_norm.bias",
        "mlp.dense_h_to_4h.weight": "mlp.up.weight", "mlp.dense_h_to_4h.bias": "mlp.up.bias",
        "mlp.dense_4h_to_h.weight": "mlp.down.weight", "mlp.dense_4h_to_h.bias": "mlp.down.bias",
    }),
)
