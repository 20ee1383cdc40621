"""The injected causal LM: embeddings, `DecoderBlock`s, final norm and LM head, built from a `ModelSpec`.

Embeddings and the LM head are replicated on every rank (simple, and the vocab of the models we
serve is small next to their blocks); the blocks are tensor-parallel.
"""
import torch
from torch import nn

from kernels.attention import AttentionMetadata
from kernels.block import DecoderBlock, KVCache, Norm, Rotary
from kernels.linear import SINGLE, TensorParallel, _param, default_weight_loader
from kernels.spec import ModelSpec


class CausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        super().__init__()
        self.spec, self.tp = spec, tp
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype, _weight=torch.empty(
            spec.vocab_size, spec.hidden_size, dtype=dtype))
        self.embed.weight.requires_grad_(False)
        self.pos_embed = None
        if spec.positional == "learned":
            rows = spec.max_positions + spec.position_offset
            self.pos_embed = nn.Embedding(rows, spec.hidden_size, dtype=dtype,
                                          _weight=torch.empty(rows, spec.hidden_size, dtype=dtype))
            self.pos_embed.weight.requires_grad_(False)
        rotary = Rotary(spec) if spec.positional == "rotary" else None
        self.layers = nn.ModuleList(DecoderBlock(spec, i, tp, dtype, rotary) for i in range(spec.num_layers))
        self.norm = Norm(spec, dtype)
        self.lm_head = None if spec.tie_word_embeddings else _param(
            spec.vocab_size, spec.hidden_size, dtype=dtype, loader=default_weight_loader)
        # checkpoint tensors that may target nothing here: a tied LM head is the embedding
        self.optional_targets = {"lm_head"} if spec.tie_word_embeddings else set()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        """input_ids, positions: [tokens] -> hidden states [tokens, hidden]."""
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions + self.spec.position_offset)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, positions, meta, kv_cache)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[tokens, hidden] -> fp32 logits [tokens, vocab]."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head
        return torch.nn.functional.linear(hidden, weight).float()
