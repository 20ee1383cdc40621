"""Llama family (Llama, Mistral, Qwen2): RMSNorm, rotary, SwiGLU, grouped-query attention,
optional QKV bias (Qwen2) and sliding-window layers (Mistral, Qwen2)."""
from kernels.spec import ModelSpec
from policies.base import Policy, WeightRule, layer_rules
from policies.rope import rope_frequencies


def _windows(c) -> tuple[int | None, ...]:
    window = getattr(c, "sliding_window", None)
    kinds = getattr(c, "layer_types", None)
    if kinds is not None:           # per-layer kinds (transformers >= 4.53 for Qwen2 and friends)
        return tuple(window if kind == "sliding_attention" else None for kind in kinds)
    if c.model_type == "qwen2" and not getattr(c, "use_sliding_window", False):
        window = None
    return (window,) * c.num_hidden_layers


def spec(c) -> ModelSpec:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    inv_freq, scaling = rope_frequencies(c, head_dim, getattr(c, "partial_rotary_factor", 1.0))
    return ModelSpec(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=head_dim, intermediate_size=c.intermediate_size, max_positions=c.max_position_embeddings,
        norm="rms", norm_eps=c.rms_norm_eps, activation=c.hidden_act, gated_mlp=True, positional="rotary",
        attn_scales=(head_dim ** -0.5,) * c.num_hidden_layers, attn_windows=_windows(c),
        qkv_bias=c.model_type == "qwen2" or getattr(c, "attention_bias", False),
        out_bias=getattr(c, "attention_bias", False), mlp_bias=getattr(c, "mlp_bias", False),
        tie_word_embeddings=c.tie_word_embeddings, rotary_inv_freq=inv_freq, rotary_scaling=scaling)


_ATTN_BIAS = {f"self_attn.{p}_proj.bias": ("attn.qkv.bias", p) for p in "qkv"}

POLICY = Policy(
    name="llama", model_types=("llama", "mistral", "qwen2"), spec=spec, prefixes=("model.",),
    rules=(
        WeightRule("model.embed_tokens.weight", "embed.weight"),
        WeightRule("model.norm.weight", "norm.weight"),
        WeightRule("lm_head.weight", "lm_head"),
    ) + layer_rules("model.layers", {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": ("attn.qkv.weight", "q"),
        "self_attn.k_proj.weight": ("attn.qkv.weight", "k"),
        "self_attn.v_proj.weight": ("attn.qkv.weight", "v"),
        **_ATTN_BIAS,
        "self_attn.o_proj.weight": "attn.out.weight", "self_attn.o_proj.bias": "attn.out.bias",
        "post_attention_layernorm.weight": "mlp_norm.weight",
        "mlp.gate_proj.weight": ("mlp.up.weight", 0), "mlp.up_proj.weight": ("mlp.up.weight", 1),
        "mlp.gate_proj.bias": ("mlp.up.bias", 0), "mlp.up_proj.bias": ("mlp.up.bias", 1),
        "mlp.down_proj.weight": "mlp.down.weight", "mlp.down_proj.bias": "mlp.down.bias",
    }),
)
