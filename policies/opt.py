"""OPT: learned positions offset by 2, LayerNorm before (most sizes) or after (350m) each residual
add, ReLU MLP, and for 350m token embeddings narrower than the blocks (`word_embed_proj_dim`),
projected in and out by `project_in` / `project_out`."""
from kernels.spec import ModelSpec
from policies.base import Policy, WeightRule, layer_rules


def spec(c) -> ModelSpec:
    if not c.layer_norm_elementwise_affine:
        raise ValueError("OPT with layer_norm_elementwise_affine=False (LayerNorms without weights) is not supported")
    head_dim = c.hidden_size // c.num_attention_heads
    pre_norm = c.do_layer_norm_before
    return ModelSpec(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, num_kv_heads=c.num_attention_heads, head_dim=head_dim,
        intermediate_size=c.ffn_dim, max_positions=c.max_position_embeddings, norm="layer", norm_eps=1e-5,
        activation=c.activation_function, gated_mlp=False, positional="learned", position_offset=2,
        attn_scales=(head_dim ** -0.5,) * c.num_hidden_layers, attn_windows=(None,) * c.num_hidden_layers,
        qkv_bias=c.enable_bias, out_bias=c.enable_bias, mlp_bias=c.enable_bias,
        post_norm=not pre_norm, final_norm=pre_norm and not c._remove_final_layer_norm,
        embed_proj_dim=c.word_embed_proj_dim or c.hidden_size, tie_word_embeddings=c.tie_word_embeddings)


POLICY = Policy(
    name="opt", model_types=("opt",), spec=spec, prefixes=("model.",), positions_from_mask=True,
    rules=(
        WeightRule("model.decoder.embed_tokens.weight", "embed.weight"),
        WeightRule("model.decoder.embed_positions.weight", "pos_embed.weight"),
        WeightRule("model.decoder.project_in.weight", "project_in"),
        WeightRule("model.decoder.project_out.weight", "project_out"),
        WeightRule("model.decoder.final_layer_norm.weight", "norm.weight"),
        WeightRule("model.decoder.final_layer_norm.bias", "norm.bias"),
        WeightRule("lm_head.weight", "lm_head"),
    ) + layer_rules("model.decoder.layers", {
        "self_attn_layer_norm.weight": "attn_norm.weight", "self_attn_layer_norm.bias": "attn_norm.bias",
        **{f"self_attn.{p}_proj.{kind}": (f"attn.qkv.{kind}", p) for p in "qkv" for kind in ("weight", "bias")},
        "self_attn.out_proj.weight": "attn.out.weight", "self_attn.out_proj.bias": "attn.out.bias",
        "final_layer_norm.weight": "mlp_norm.weight", "final_layer_norm.bias": "mlp_norm.bias",
        "fc1.weight": "mlp.up.weight", "fc1.bias": "mlp.up.bias",
        "fc2.weight": "mlp.down.weight", "fc2.bias": "mlp.down.bias",
    }),
)
