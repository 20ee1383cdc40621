"""The injected causal LM: embeddings, `DecoderBlock`s, final norm and LM head, built from a `ModelSpec`.

Embeddings and the LM head are replicated on every rank (simple, and the vocab of the models we
serve is small next to their blocks); the blocks are tensor-parallel.

A quantized model with `quant.lm_head` also holds an int8/int4 copy of the LM head (`quantize_head`)
and takes every step's logits from it: at batch 1 the head is a tenth of an int8 GPT-Neo 2.7B's
weight bytes. The float head stays (tied, it is the embedding table; it is also what checkpoints
save), so the copy costs memory while it saves bandwidth.

The LM head's rows (the embedding's, when tied) sit in storage padded to a multiple of 64 rows with
zeros: the parameter is the first `vocab` rows, as checkpoints have it, and on CUDA the LM head
multiplies the padded matrix and drops the extra logits. cuBLAS picks an unaligned (align1) kernel
for GPT-Neo's odd vocab of 50,257: 262 us a step at batch 32 on an H100 (bench/profile_step.py).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import AttentionMetadata
from kernels.block import DecoderBlock, KVCache, Norm, Rotary
from kernels.dispatch import use_triton
from kernels.embedding import embed
from kernels.gemv_tuner import streamed_linear
from kernels.linear import SINGLE, SKINNY_MAX_ROWS, TensorParallel, _param, default_weight_loader
from kernels.quant import QuantSpec, quant_linear
from kernels.spec import ModelSpec


VOCAB_PAD = 64


def _padded_rows(rows: int, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, *shape], the first rows of zeroed storage of `rows` rounded up to VOCAB_PAD."""
    return torch.zeros(-(-rows // VOCAB_PAD) * VOCAB_PAD, *shape, dtype=dtype)[:rows]


def with_padding(t: torch.Tensor) -> torch.Tensor:
    """`t` widened to the padded rows its storage holds (`_padded_rows`); `t` itself when it has none
    (e.g. a parameter replaced by a compact tensor)."""
    size = (-(-t.shape[0] // VOCAB_PAD) * VOCAB_PAD, *t.shape[1:])
    if size[0] == t.shape[0] or t.storage_offset() or not t.is_contiguous() or \
            t.untyped_storage().nbytes() < math.prod(size) * t.element_size():
        return t
    return t.as_strided(size, t.stride())


def _embedding(rows: int, width: int, dtype: torch.dtype) -> nn.Embedding:
    embed = nn.Embedding(rows, width, dtype=dtype, _weight=_padded_rows(rows, width, dtype=dtype))
    embed.weight.requires_grad_(False)
    return embed


def _replicated(*shape: int, dtype: torch.dtype, present: bool = True, padded: bool = False) -> nn.Parameter | None:
    """A parameter every rank holds whole; `padded`: in `_padded_rows` storage (the LM head's weight, bias)."""
    if not present:
        return None
    return _param(*shape, dtype=dtype, loader=default_weight_loader,
                  data=_padded_rows(*shape, dtype=dtype) if padded else None)


class CausalLM(nn.Module):
    """`dtype` is the compute dtype (activations, embeddings, norms, LM head, biases); with `quant` the
    blocks' linears hold quantized weights (kernels/quant.py) and nothing else is quantized."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, tp: TensorParallel = SINGLE,
                 quant: QuantSpec | None = None):
        super().__init__()
        self.spec, self.tp, self.quant = spec, tp, quant
        hidden, width = spec.hidden_size, spec.embed_dim
        self.embed = _embedding(spec.vocab_size, width, dtype)
        # OPT's narrower token embeddings: [hidden, embed_dim] in, [embed_dim, hidden] out
        self.project_in = _replicated(hidden, width, dtype=dtype, present=width != hidden)
        self.project_out = _replicated(width, hidden, dtype=dtype, present=width != hidden)
        self.pos_embed = None
        if spec.positional == "learned":
            self.pos_embed = _embedding(spec.max_positions + spec.position_offset, hidden, dtype)
        self.embed_norm = Norm(spec, dtype) if spec.embed_norm else None
        rotary = Rotary(spec) if spec.positional == "rotary" else None
        self.layers = nn.ModuleList(DecoderBlock(spec, i, tp, dtype, rotary, quant) for i in range(spec.num_layers))
        self.norm = Norm(spec, dtype) if spec.final_norm else None
        self.lm_head = _replicated(spec.vocab_size, width, dtype=dtype, present=not spec.tie_word_embeddings,
                                   padded=True)
        self.lm_head_bias = _replicated(spec.vocab_size, dtype=dtype, present=spec.lm_head_bias, padded=True)
        self.head_quant = quant.for_head() if quant is not None and quant.lm_head else None
        if self.head_quant is not None:
            self.head_quant.check("lm_head", [], width)
        self.register_buffer("head_qweight", None, persistent=False)      # `quantize_head`
        self.register_buffer("head_scales", None, persistent=False)
        # checkpoint tensors that may target nothing here: a tied LM head is the embedding; a final
        # norm the family drops (OPT's `_remove_final_layer_norm`)
        self.optional_targets = ({"lm_head"} if spec.tie_word_embeddings else set()) | \
            (set() if spec.final_norm else {"norm.weight", "norm.bias"})

    def embed_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [tokens] -> the first block's input [tokens, hidden]."""
        pos_table = None if self.pos_embed is None else self.pos_embed.weight
        if self.project_in is None:                             # both lookups and the add: one kernel on CUDA
            x = embed(input_ids, positions, self.embed.weight, pos_table, self.spec.position_offset)
        else:                                                   # OPT-350m: project the tokens, then add
            x = F.linear(self.embed(input_ids), self.project_in)
            if pos_table is not None:
                x = x + self.pos_embed(positions + self.spec.position_offset)
        return x if self.embed_norm is None else self.embed_norm(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        """input_ids, positions: [tokens] -> hidden states [tokens, hidden]."""
        x, pending = self.embed_tokens(input_ids, positions), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, pending = layer(x, positions, meta, kv_cache, pending)
        if self.norm is not None:
            return self.norm.add(x, pending)[0]
        return x if pending is None else x + pending

    def quantize_head(self, rows_at_once: int = 8192) -> None:
        """With `quant.lm_head`: quantize the loaded LM head (its padded rows, `with_padding`) into
        `head_qweight` / `head_scales`, `rows_at_once` rows at a time (a bounded fp32 transient)."""
        if self.head_quant is None:
            return
        weight = with_padding(self.embed.weight if self.lm_head is None else self.lm_head)
        parts = [self.head_quant.quantize(weight[i:i + rows_at_once], weight.dtype)
                 for i in range(0, weight.shape[0], rows_at_once)]
        self.head_qweight = torch.cat([q for q, _ in parts])
        self.head_scales = torch.cat([s for _, s in parts])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[tokens, hidden] -> fp32 logits [tokens, vocab]."""
        if self.project_out is not None:
            hidden = F.linear(hidden, self.project_out)
        weight = self.embed.weight if self.lm_head is None else self.lm_head
        if self.head_qweight is not None:
            return quantized_head_logits(hidden, self.head_qweight, self.head_scales, self.head_quant,
                                         self.lm_head_bias, weight.shape[0])
        return lm_head_logits(hidden, weight, self.lm_head_bias, padded=hidden.is_cuda)


def quantized_head_logits(hidden: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, quant: QuantSpec,
                          bias: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """`lm_head_logits` from the quantized padded head: the streaming kernels below
    DEQUANT_MIN_ROWS rows, a transient float copy and cuBLAS above (`quant_linear`), as the blocks'
    linears; on CPU the torch reference."""
    if bias is not None:
        bias = with_padding(bias)
        bias = bias if bias.shape[0] == qweight.shape[0] else F.pad(bias[:vocab], (0, qweight.shape[0] - vocab))
    logits = quant_linear(hidden, qweight, scales, quant.bits, quant.k_group(hidden.shape[-1]), bias)
    return logits[:, :vocab].float().contiguous()


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   padded: bool) -> torch.Tensor:
    """fp32 logits [tokens, vocab] of hidden [tokens, width]; with `padded`, the product runs over the
    padded rows (`with_padding`) and the extra logits are dropped."""
    vocab = weight.shape[0]
    if padded:
        weight = with_padding(weight)
        if bias is not None:
            bias = with_padding(bias)
            if bias.shape[0] != weight.shape[0]:            # one of them lost its padding
                weight, bias = weight[:vocab], bias[:vocab]
    if use_triton(hidden) and hidden.shape[0] <= SKINNY_MAX_ROWS:     # decode: stream the LM head
        logits = streamed_linear(hidden, weight, bias, torch_path=lambda v, w: F.linear(v, w, bias))
    else:
        logits = F.linear(hidden, weight, bias)
    return logits[:, :vocab].float().contiguous()
