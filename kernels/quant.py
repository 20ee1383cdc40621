"""Weight-only quantization of the injected blocks' linears: the storage format, quantize/dequantize,
and `quant_linear` (the torch reference on CPU; kernels/gemv.py's Triton kernel on CUDA).

Format (a quantized linear stores `qweight` and `scales` instead of `weight`; its bias stays in the
compute dtype). N = output features of this rank's shard, K = its input features:
- bits=8: `qweight` int8 [N, K], values in [-127, 127], symmetric (scale = absmax / 127).
- bits=4: `qweight` uint8 [N, K // 2]: column 2j in the LOW nibble, column 2j+1 in the HIGH nibble;
  nibble = q + 8 with q in [-8, 7]; symmetric, scale = absmax / 7 (so -8 is never produced); K even.
- `scales`: [N, K // group_size] in the compute dtype; w[n, k] = q[n, k] * scales[n, k // group_size].

int8 MoQ (DeepSpeed's `quantization_setting`): `row_groups` groups of consecutive OUTPUT rows per
matrix (DeepSpeed's `weight.reshape(groups, -1)` of the row-major [out, in] weight), one scale per
group, stored expanded per row: group_size = K and scales [N, 1], rows of one group sharing the value.
The "matrix" is each logical part as this rank loads it: q, k, v (and gate, up) separately, each its
rank's shard; the MLP's linears use twice the groups with `mlp_extra_grouping`. Without row groups
int8 has one scale per row (or per (row, K-group) with `group_size`); int4 always uses K-groups.

With `lm_head`, the model also keeps a copy of its LM head in this format (`for_head`: MoQ's row
groups do not apply, so int8 scales it per row or per K-group), built from the float head after
loading (kernels/model.py); checkpoints never store it.
"""
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton
from kernels.dequant import DEQUANT_MIN_ROWS, dequantize_weight
from kernels.gemv_tuner import streamed_linear

QMAX = {8: 127, 4: 7}


@dataclass(frozen=True)
class QuantSpec:
    """How the block linears are quantized (derived from the config; see the module doc)."""
    bits: int = 8
    group_size: int | None = None       # along K; None: the whole row (int8 only)
    row_groups: int | None = None       # int8 MoQ: groups of output rows per part; None: one per row
    mlp_extra_grouping: bool = False
    quantize_qkv: bool = True
    lm_head: bool = False               # also a quantized copy of the LM head (not part of the stored format)

    def __post_init__(self):
        if self.bits not in QMAX:
            raise ValueError(f"quantization bits={self.bits}: expected 8 or 4")
        if self.bits == 4 and (self.group_size is None or self.row_groups is not None):
            raise ValueError("int4 quantizes in K-groups of group_size (row groups are int8 only)")

    def for_mlp(self) -> "QuantSpec":
        """The MLP's spec: twice the row groups with `mlp_extra_grouping`."""
        if self.mlp_extra_grouping and self.row_groups:
            return replace(self, row_groups=2 * self.row_groups, mlp_extra_grouping=False)
        return self

    def for_head(self) -> "QuantSpec":
        """The LM head copy's spec: the blocks' bits and K-groups, a scale per row rather than MoQ's row groups."""
        return replace(self, row_groups=None, mlp_extra_grouping=False)

    def k_group(self, k: int) -> int:
        return self.group_size or k

    def shapes(self, n: int, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(qweight shape, scales shape) of an [n, k] weight."""
        return (n, k // 2 if self.bits == 4 else k), (n, k // self.k_group(k))

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.uint8 if self.bits == 4 else torch.int8

    def check(self, layer: str, part_rows: list[int], k: int) -> None:
        """ValueError naming `layer` and the sizes unless every part and K split into the groups."""
        if self.bits == 4 and k % 2:
            raise ValueError(f"{layer}: int4 needs an even number of input features, this rank has {k}")
        if k % self.k_group(k):
            raise ValueError(f"{layer}: group_size={self.group_size} does not divide this rank's {k} input "
                             "features (row-parallel layers hold in_features / tp_size); choose a group_size "
                             f"that divides {k}, e.g. quant={{'weight': {{'group_size': {_divisor_below(k, self.group_size)}}}}}")
        for rows in part_rows:
            if self.row_groups and rows % self.row_groups:
                raise ValueError(f"{layer}: quantize_groups={self.row_groups} does not divide the {rows} "
                                 f"output rows of a part of this rank's shard (parts {part_rows})")

    def quantize(self, w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One part [rows, K] (float) -> (qweight, scales) in this spec's format."""
        if self.row_groups:
            return quantize_row_groups(w, self.row_groups, scale_dtype)
        return quantize(w, self.bits, self.k_group(w.shape[1]), scale_dtype)

    def to_dict(self) -> dict:
        """The stored format of the block linears (what a pre-quantized checkpoint records)."""
        return {k: v for k, v in asdict(self).items() if k != "lm_head"}


def _divisor_below(k: int, limit: int) -> int:
    return max(d for d in range(1, min(k, limit) + 1) if k % d == 0 and d % 2 == 0) if k > 1 else 1


def _codes(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """round(w / scale) clamped to [-qmax, qmax], from the scale as stored (so dequantizing matches)."""
    return torch.round(w.float() / scale.float()).clamp_(-qmax, qmax)


def _scale(absmax: torch.Tensor, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    tiny = torch.finfo(dtype).tiny                  # an all-zero group keeps a usable, nonzero scale
    return (absmax.float() / qmax).clamp_(min=tiny).to(dtype)


def quantize(w: torch.Tensor, bits: int, group_size: int,
             scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (qweight, scales [N, K // group_size]): symmetric, one scale per (row, K-group)."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide K={k}")
    groups = w.reshape(n, k // group_size, group_size)
    scales = _scale(groups.abs().amax(-1), QMAX[bits], scale_dtype or w.dtype)          # [N, K // group]
    q = _codes(groups, scales.unsqueeze(-1), QMAX[bits]).reshape(n, k)
    return (pack_int4(q) if bits == 4 else q.to(torch.int8)), scales


def quantize_row_groups(w: torch.Tensor, groups: int,
                        scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSpeed MoQ int8: `groups` runs of consecutive rows of w [N, K], one scale each
    (`w.reshape(groups, -1)`), returned expanded per row: (qweight int8 [N, K], scales [N, 1])."""
    n, k = w.shape
    if groups < 1 or n % groups:
        raise ValueError(f"quantize_groups={groups} does not divide the {n} output rows")
    scale = _scale(w.reshape(groups, -1).abs().amax(-1), QMAX[8], scale_dtype or w.dtype)   # [groups]
    scales = scale.repeat_interleave(n // groups).unsqueeze(1)                              # [N, 1]
    return _codes(w, scales, QMAX[8]).to(torch.int8), scales


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] with values in [-8, 7] -> uint8 [N, K // 2]: column 2j low nibble, 2j+1 high."""
    nibbles = (q.to(torch.int16) + 8).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> int8 [N, K] in [-8, 7]."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(1).to(torch.int8) - 8


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """(qweight, scales) -> w [N, K] in `dtype` (default: the scales' dtype)."""
    dtype = dtype or scales.dtype
    q = unpack_int4(qweight) if bits == 4 else qweight
    n, k = q.shape
    w = q.reshape(n, k // group_size, group_size).to(dtype) * scales.to(dtype).unsqueeze(-1)
    return w.reshape(n, k)


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b with W stored quantized. x [..., K] -> [..., N]."""
    if use_triton(x):
        if x.numel() // x.shape[-1] >= DEQUANT_MIN_ROWS[bits]:    # large M: one transient float copy, cuBLAS
            return F.linear(x, dequantize_weight(qweight, scales, bits, group_size, x.dtype), bias)
        return streamed_linear(x, qweight, bias, scales, bits, group_size)   # dequantized in registers
    return F.linear(x, dequantize(qweight, scales, bits, group_size, x.dtype), bias)
