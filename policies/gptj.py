"""GPT-J: attention and MLP side by side on one LayerNorm, interleaved rotary on the first
`rotary_dim` channels of each head, no QKV bias, an LM head with a bias."""
from kernels.spec import ModelSpec
from policies.base import Policy, WeightRule, layer_rules
from policies.rope import rope_frequencies


def spec(c) -> ModelSpec:
    head_dim = c.n_embd // c.n_head
    partial = (c.rotary_dim or head_dim) / head_dim
    inv_freq, _ = rope_frequencies(c, head_dim, partial)       # GPT-J's config: base 10000, no scaling
    return ModelSpec(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, num_layers=c.n_layer, num_heads=c.n_head,
        num_kv_heads=c.n_head, head_dim=head_dim, intermediate_size=c.n_inner or 4 * c.n_embd,
        max_positions=c.n_positions, norm="layer", norm_eps=c.layer_norm_epsilon,
        activation=c.activation_function, gated_mlp=False, positional="rotary",
        attn_scales=(head_dim ** -0.5,) * c.n_layer, attn_windows=(None,) * c.n_layer,
        out_bias=False, mlp_bias=True, parallel_residual=True, shared_norm=True, lm_head_bias=True,
        rotary_inv_freq=inv_freq, rotary_interleaved=True, tie_word_embeddings=c.tie_word_embeddings)


POLICY = Policy(
    name="gptj", model_types=("gptj",), spec=spec, prefixes=("transformer.",),
    rules=(
        WeightRule("transformer.wte.weight", "embed.weight"),
        WeightRule("transformer.ln_f.weight", "norm.weight"),
        WeightRule("transformer.ln_f.bias", "norm.bias"),
        WeightRule("lm_head.weight", "lm_head"),
        WeightRule("lm_head.bias", "lm_head_bias"),
    ) + layer_rules("transformer.h", {
        "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
        "attn.q_proj.weight": ("attn.qkv.weight", "q"),
        "attn.k_proj.weight": ("attn.qkv.weight", "k"),
        "attn.v_proj.weight": ("attn.qkv.weight", "v"),
        "attn.out_proj.weight": "attn.out.weight",
        "mlp.fc_in.weight": "mlp.up.weight", "mlp.fc_in.bias": "mlp.up.bias",
        "mlp.fc_out.weight": "mlp.down.weight", "mlp.fc_out.bias": "mlp.down.bias",
    }),
)
