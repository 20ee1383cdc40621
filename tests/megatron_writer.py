"""Megatron-LM GPT checkpoints written from an HF GPT-2, for tests (`mp_rank_0X/model_optim_rng.pt`).

HF GPT-2 (Conv1D weights stored [in, out]) -> Megatron (nn.Linear, [out, in]), shard m of M:
    transformer.wte.weight [V, h]       -> language_model.embedding.word_embeddings.weight: zero rows pad
                                           V to a multiple of 128 * M (Megatron's padded vocab), then
                                           shard m keeps rows [m Vp / M, (m + 1) Vp / M)
    transformer.wpe.weight              -> language_model.embedding.position_embeddings.weight (every shard)
    transformer.h.N.ln_1.{weight,bias}  -> language_model.encoder.layers.N.input_layernorm.*
    transformer.h.N.attn.c_attn.{w,b}   -> ...self_attention.query_key_value.*: c_attn.T is [q; k; v]
                                           ([3h, h], heads contiguous in each); shard m keeps its heads'
                                           rows of q, k and v, ordered by checkpoint_version:
                                           0 -> [3, np, hn], 1 -> [np, hn, 3], >= 2 -> [np, 3, hn]
    transformer.h.N.attn.c_proj.weight  -> ...self_attention.dense.weight: .T, split on dim 1; bias whole
    transformer.h.N.ln_2.{weight,bias}  -> ...post_attention_layernorm.*
    transformer.h.N.mlp.c_fc.{w,b}      -> ...mlp.dense_h_to_4h.*: .T, split on dim 0 (bias too)
    transformer.h.N.mlp.c_proj.weight   -> ...mlp.dense_4h_to_h.weight: .T, split on dim 1; bias whole
    transformer.ln_f.{weight,bias}      -> language_model.encoder.final_layernorm.*
An untied LM head goes, padded and split like the embeddings, to language_model.output_layer.weight.
Each file also holds `args` (an argparse.Namespace, as Megatron saves it) and `checkpoint_version`.
`old_names=True` writes `transformer` for `encoder` and `attention.` for `self_attention.` (older Megatron).
"""
import argparse
import os

import torch


def megatron_args(config, mp: int, padded_vocab: int) -> argparse.Namespace:
    return argparse.Namespace(
        num_layers=config.n_layer, hidden_size=config.n_embd, num_attention_heads=config.n_head,
        ffn_hidden_size=config.n_inner or 4 * config.n_embd, max_position_embeddings=config.n_positions,
        padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=128, tensor_model_parallel_size=mp,
        pipeline_model_parallel_size=1, openai_gelu=config.activation_function == "gelu_new",
        bias_gelu_fusion=False, layernorm_epsilon=config.layer_norm_epsilon, params_dtype=torch.float32,
        untie_embeddings_and_output_weights=not config.tie_word_embeddings)


def order_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, version: float) -> torch.Tensor:
    """One shard's q, k, v rows ([np * hn, ...] each) in the fused layout of `version`."""
    qkv = torch.stack([t.unflatten(0, (heads, -1)) for t in (q, k, v)])      # [3, np, hn, ...]
    if version == 1:
        qkv = qkv.permute(1, 2, 0, *range(3, qkv.dim()))                        # [np, hn, 3, ...]
    elif version >= 2:
        qkv = qkv.transpose(0, 1)                                                # [np, 3, hn, ...]
    return qkv.flatten(0, 2)


def shard_state(state: dict, config, m: int, mp: int, version: float, padded_vocab: int) -> dict:
    """Shard m's `language_model` tensors under Megatron's (new) names."""
    def part(t, dim):
        return t.chunk(mp, dim)[m].clone()

    h, heads = config.n_embd, config.n_head
    wte = torch.cat([state["transformer.wte.weight"], torch.zeros(padded_vocab - config.vocab_size, h)])
    encoder = {}
    for n in range(config.n_layer):
        hf, ours = f"transformer.h.{n}.", f"layers.{n}."
        for kind in ("weight", "bias"):
            fused = state[hf + "attn.c_attn." + kind]
            fused = fused.t() if kind == "weight" else fused                      # [3h, h] = [q; k; v]
            q, k, v = (part(t, 0) for t in fused.split(h))
            encoder[ours + "self_attention.query_key_value." + kind] = order_qkv(q, k, v, heads // mp, version)
            encoder[ours + "input_layernorm." + kind] = state[hf + "ln_1." + kind].clone()
            encoder[ours + "post_attention_layernorm." + kind] = state[hf + "ln_2." + kind].clone()
        encoder[ours + "self_attention.dense.weight"] = part(state[hf + "attn.c_proj.weight"].t(), 1)
        encoder[ours + "self_attention.dense.bias"] = state[hf + "attn.c_proj.bias"].clone()
        encoder[ours + "mlp.dense_h_to_4h.weight"] = part(state[hf + "mlp.c_fc.weight"].t(), 0)
        encoder[ours + "mlp.dense_h_to_4h.bias"] = part(state[hf + "mlp.c_fc.bias"], 0)
        encoder[ours + "mlp.dense_4h_to_h.weight"] = part(state[hf + "mlp.c_proj.weight"].t(), 1)
        encoder[ours + "mlp.dense_4h_to_h.bias"] = state[hf + "mlp.c_proj.bias"].clone()
    for kind in ("weight", "bias"):
        encoder["final_layernorm." + kind] = state["transformer.ln_f." + kind].clone()
    embedding = {"word_embeddings": {"weight": part(wte, 0)},
                 "position_embeddings": {"weight": state["transformer.wpe.weight"].clone()}}
    lm = {"embedding": embedding, "encoder": encoder}
    if not config.tie_word_embeddings:                       # untied: a vocab-parallel output layer
        head = torch.cat([state["lm_head.weight"], torch.zeros(padded_vocab - config.vocab_size, h)])
        lm["output_layer"] = {"weight": part(head, 0)}
    return lm


def write_megatron(hf, directory: str, mp: int, version: float = 3.0, old_names: bool = False) -> list[str]:
    """Write `hf` (a GPT2LMHeadModel) as a Megatron checkpoint at MP degree `mp` under `directory`;
    returns the files relative to it, in rank order (a Megatron description's "checkpoints")."""
    config, state = hf.config, {k: v.detach().float() for k, v in hf.state_dict().items()}
    multiple = 128 * mp
    padded_vocab = -(-config.vocab_size // multiple) * multiple
    files = []
    for m in range(mp):
        lm = shard_state(state, config, m, mp, version, padded_vocab)
        if old_names:
            encoder = lm.pop("encoder")
            lm["transformer"] = {k.replace("self_attention.", "attention."): v for k, v in encoder.items()}
        name = f"mp_rank_{m:02d}/model_optim_rng.pt"
        os.makedirs(os.path.join(directory, os.path.dirname(name)), exist_ok=True)
        torch.save({"model": {"language_model": lm}, "args": megatron_args(config, mp, padded_vocab),
                    "checkpoint_version": version, "iteration": 1000}, os.path.join(directory, name))
        files.append(name)
    return files
