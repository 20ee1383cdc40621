"""The injected decoder block: one generic block whose family differences are knobs on `ModelSpec`."""
import math

import torch
from torch import nn

from kernels.activation import FUSED_NAME, activation
from kernels.attention import AttentionMetadata, attention
from kernels.linear import (ColumnParallelLinear, Fold, MergedColumnParallelLinear, QKVParallelLinear,
                            RowParallelLinear, TensorParallel, _param, default_weight_loader)
from kernels.norm import layer_norm, rms_norm
from kernels.quant import QuantSpec
from kernels.rotary import apply_rotary, rotary_cos_sin
from kernels.spec import ModelSpec

KVCache = tuple[torch.Tensor, torch.Tensor]     # k, v: [num_blocks, block_size, kv_heads, head_dim]


class Norm(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        self.kind, self.eps = spec.norm, spec.norm_eps
        self.weight = _param(spec.hidden_size, dtype=dtype, loader=default_weight_loader)
        has_bias = spec.norm == "layer" and spec.norm_bias
        self.bias = _param(spec.hidden_size, dtype=dtype, loader=default_weight_loader) if has_bias else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, (norm(x + residual), x + residual) in one kernel."""
        if self.kind == "rms":
            return rms_norm(x, self.weight, self.eps, residual)
        return layer_norm(x, self.weight, self.bias, self.eps, residual)

    def add(self, x: torch.Tensor, pending: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + pending), x + pending); pending None: (norm(x), x)."""
        return (self(x), x) if pending is None else self(x, pending)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.), including the interleaved extra slopes for non-power-of-two heads."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < num_heads:
        extra = 2.0 ** (-4.0 / closest)
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


class Rotary(nn.Module):
    """The cos/sin cache, built once per model and shared by every layer's attention."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.interleaved = spec.rotary_interleaved
        inv_freq = torch.tensor(spec.rotary_inv_freq, dtype=torch.float32)
        self.register_buffer("cos_sin", rotary_cos_sin(inv_freq, spec.max_positions, spec.rotary_scaling),
                             persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        return apply_rotary(q, k, positions, self.cos_sin, self.interleaved)


class Attention(nn.Module):
    """Fused QKV -> (rotary) -> write KV cache -> paged attention -> row-parallel output."""

    def __init__(self, spec: ModelSpec, layer: int, tp: TensorParallel, dtype: torch.dtype,
                 rotary: Rotary | None = None, quant: QuantSpec | None = None):
        super().__init__()
        self.qkv = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads,
                                     spec.qkv_bias, tp, dtype, quant if quant and quant.quantize_qkv else None)
        self.out = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, spec.out_bias, tp, dtype,
                                     quant)
        self.scale, self.window = spec.attn_scales[layer], spec.attn_windows[layer]
        self.rotary = rotary
        self.l2_ahead = quant is None or quant.bits != 4        # see kernels.decode_plan.decode_chunk
        slopes = None
        if spec.positional == "alibi":
            heads = self.qkv.num_heads
            slopes = alibi_slopes(spec.num_heads)[tp.rank * heads:(tp.rank + 1) * heads]
        self.register_buffer("alibi", slopes, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: KVCache, residual: torch.Tensor | None = None, fold: Fold | None = None) -> torch.Tensor:
        """attention(x) + residual (added in the output projection's epilogue); with `fold` (QKV's
        `norm_fold`), attention(norm(x)), the norm inside QKV."""
        q, k, v = self.qkv(x, fold=fold)             # [tokens, heads | kv_heads, head_dim]
        if self.rotary is not None:
            q, k = self.rotary(q, k, positions)
        o = attention(q, k, v, *kv_cache, meta, self.scale, self.window, self.alibi, self.l2_ahead)
        return self.out(o.flatten(1), residual)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TensorParallel, dtype: torch.dtype, quant: QuantSpec | None = None):
        super().__init__()
        self.gated = spec.gated_mlp
        quant = quant and quant.for_mlp()            # MoQ's mlp_extra_grouping: twice the row groups
        if self.gated:
            self.up = MergedColumnParallelLinear(spec.hidden_size, [spec.intermediate_size] * 2, spec.mlp_bias,
                                                 tp, dtype, quant)
        else:
            self.up = ColumnParallelLinear(spec.hidden_size, spec.intermediate_size, spec.mlp_bias, tp, dtype, quant)
        self.down = RowParallelLinear(spec.intermediate_size, spec.hidden_size, spec.mlp_bias, tp, dtype, quant)
        self.act, self.act_name = activation(spec.activation), FUSED_NAME[spec.activation]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, fold: Fold | None = None) -> torch.Tensor:
        """mlp(x) + residual; the activation (ungated) and the residual ride in the matmul epilogues;
        with `fold` (MLP up's `norm_fold`), mlp(norm(x)), the norm inside MLP up."""
        if self.gated:
            gate, up = self.up(x, fold=fold).chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.up(x, self.act_name, fold=fold)
        return self.down(h, residual)


class DecoderBlock(nn.Module):
    """Pre-norm (default), post-norm (`post_norm`) or parallel-residual (`parallel_residual`, with one
    norm shared by attention and MLP when `shared_norm`) residual layout around `Attention` and `MLP`.
    With `quant` its linears hold quantized weights; norms stay in `dtype` (the compute dtype).

    The residual stream travels between blocks as (x, pending): the stream is x + pending, and the
    next norm adds them in its own kernel (`Norm.add`) instead of a separate add after each
    sublayer. `pending` is None after a post-norm block.

    Pre-norm blocks whose QKV and MLP-up products can each do the norm before them (decode batches
    whose tiles take it: `_Linear.norm_fold`) run without norm kernels instead (`_forward_folded`):
    those products read the stream itself, and the output projection and MLP down add the residual
    in their epilogues, so the block hands on (x, None)."""

    def __init__(self, spec: ModelSpec, layer: int, tp: TensorParallel, dtype: torch.dtype,
                 rotary: Rotary | None = None, quant: QuantSpec | None = None):
        super().__init__()
        self.parallel_residual, self.post_norm = spec.parallel_residual, spec.post_norm
        self.attn_norm = Norm(spec, dtype)
        try:
            self.attn = Attention(spec, layer, tp, dtype, rotary, quant)
            self.mlp_norm = None if spec.shared_norm else Norm(spec, dtype)
            self.mlp = MLP(spec, tp, dtype, quant)
        except ValueError as e:                      # e.g. quantization groups that do not divide a part
            raise ValueError(f"layer {layer}: {e}") from None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache,
                pending: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x, pending) in -> (x, pending) out, the stream being their sum."""
        folds = None if self.post_norm else self._folds(x)
        if folds is not None:
            return self._forward_folded(x, positions, meta, kv_cache, pending, folds)
        if self.post_norm:
            if pending is not None:
                x = x + pending
            x = self.attn_norm(self.attn(x, positions, meta, kv_cache, residual=x))
            return self.mlp_norm(self.mlp(x, residual=x)), None
        h, x = self.attn_norm.add(x, pending)
        if self.parallel_residual:
            after_attn = self.attn(h, positions, meta, kv_cache, residual=x)
            return after_attn, self.mlp(h if self.mlp_norm is None else self.mlp_norm(x))
        h, x = self.mlp_norm(self.attn(h, positions, meta, kv_cache), x)
        return x, self.mlp(h)

    @property
    def _mlp_input_norm(self) -> Norm:
        return self.attn_norm if self.mlp_norm is None else self.mlp_norm

    def _folds(self, x: torch.Tensor) -> tuple[Fold, Fold] | None:
        """QKV's and MLP up's folds (`_Linear.norm_fold`) where both do their norms at x's rows, else None."""
        up_act = None if self.mlp.gated else self.mlp.act_name
        qkv = self.attn.qkv.norm_fold(x, self.attn_norm)
        up = None if qkv is None else self.mlp.up.norm_fold(x, self._mlp_input_norm, up_act)
        return None if up is None else (qkv, up)

    def _forward_folded(self, x, positions, meta, kv_cache, pending, folds: tuple[Fold, Fold]):
        if pending is not None:                      # after a block that did not fold (not at one batch size)
            x = x + pending
        qkv_fold, up_fold = folds
        after_attn = self.attn(x, positions, meta, kv_cache, residual=x, fold=qkv_fold)
        mlp_in = x if self.parallel_residual else after_attn
        return self.mlp(mlp_in, residual=after_attn, fold=up_fold), None
