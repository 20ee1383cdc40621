"""GPT-2: learned positions, LayerNorm, gelu_new MLP, fused c_attn stored as Conv1D ([in, out])."""
import math

from kernels.spec import ModelSpec
from policies.base import Policy, WeightRule, layer_rules


def spec(c) -> ModelSpec:
    head_dim = c.n_embd // c.n_head
    scales = []
    for layer in range(c.n_layer):
        scale = 1 / math.sqrt(head_dim) if c.scale_attn_weights else 1.0
        scales.append(scale / (layer + 1) if c.scale_attn_by_inverse_layer_idx else scale)
    return ModelSpec(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, num_layers=c.n_layer, num_heads=c.n_head,
        num_kv_heads=c.n_head, head_dim=head_dim, intermediate_size=c.n_inner or 4 * c.n_embd,
        max_positions=c.n_positions, norm="layer", norm_eps=c.layer_norm_epsilon,
        activation=c.activation_function, gated_mlp=False, positional="learned",
        attn_scales=tuple(scales), attn_windows=(None,) * c.n_layer,
        qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=c.tie_word_embeddings)


POLICY = Policy(
    name="gpt2", model_types=("gpt2",), spec=spec, prefixes=("transformer.",),
    rules=(
        WeightRule("transformer.wte.weight", "embed.weight"),
        WeightRule("transformer.wpe.weight", "pos_embed.weight"),
        WeightRule("transformer.ln_f.weight", "norm.weight"),
        WeightRule("transformer.ln_f.bias", "norm.bias"),
        WeightRule("lm_head.weight", "lm_head"),
    ) + layer_rules("transformer.h", {
        "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
        "attn.c_attn.weight": ("attn.qkv.weight", None, True), "attn.c_attn.bias": "attn.qkv.bias",
        "attn.c_proj.weight": ("attn.out.weight", None, True), "attn.c_proj.bias": "attn.out.bias",
        "ln_2.weight": "mlp_norm.weight", "ln_2.bias": "mlp_norm.bias",
        "mlp.c_fc.weight": ("mlp.up.weight", None, True), "mlp.c_fc.bias": "mlp.up.bias",
        "mlp.c_proj.weight": ("mlp.down.weight", None, True), "mlp.c_proj.bias": "mlp.down.bias",
    }),
)
