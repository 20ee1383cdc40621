"""GPT-Neo: learned positions, LayerNorm, GELU MLP, global and local (windowed) attention layers,
and attention scores that are *not* scaled by 1/sqrt(head_dim)."""
from kernels.spec import ModelSpec
from policies.base import Policy, WeightRule, layer_rules


def spec(c) -> ModelSpec:
    windows = tuple(c.window_size if kind == "local" else None for kind in c.attention_layers)
    return ModelSpec(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_layers,
        num_heads=c.num_heads, num_kv_heads=c.num_heads, head_dim=c.hidden_size // c.num_heads,
        intermediate_size=c.intermediate_size or 4 * c.hidden_size, max_positions=c.max_position_embeddings,
        norm="layer", norm_eps=c.layer_norm_epsilon, activation=c.activation_function, gated_mlp=False,
        positional="learned", attn_scales=(1.0,) * c.num_layers, attn_windows=windows,
        out_bias=True, mlp_bias=True, tie_word_embeddings=c.tie_word_embeddings)


POLICY = Policy(
    name="gpt_neo", model_types=("gpt_neo",), spec=spec, prefixes=("transformer.",),
    rules=(
        WeightRule("transformer.wte.weight", "embed.weight"),
        WeightRule("transformer.wpe.weight", "pos_embed.weight"),
        WeightRule("transformer.ln_f.weight", "norm.weight"),
        WeightRule("transformer.ln_f.bias", "norm.bias"),
        WeightRule("lm_head.weight", "lm_head"),
    ) + layer_rules("transformer.h", {
        "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
        "attn.attention.q_proj.weight": ("attn.qkv.weight", "q"),
        "attn.attention.k_proj.weight": ("attn.qkv.weight", "k"),
        "attn.attention.v_proj.weight": ("attn.qkv.weight", "v"),
        "attn.attention.out_proj.weight": "attn.out.weight", "attn.attention.out_proj.bias": "attn.out.bias",
        "ln_2.weight": "mlp_norm.weight", "ln_2.bias": "mlp_norm.bias",
        "mlp.c_fc.weight": "mlp.up.weight", "mlp.c_fc.bias": "mlp.up.bias",
        "mlp.c_proj.weight": "mlp.down.weight", "mlp.c_proj.bias": "mlp.down.bias",
    }),
)
