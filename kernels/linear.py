"""Tensor-parallel linear layers. Each allocates only its shard and owns a `weight_loader`
that takes the *full* tensor from a checkpoint and keeps its part.

Column-parallel layers split the output features across ranks (no communication); the
row-parallel layer splits the input features and all-reduces its partial sums in `forward`.

With a `QuantSpec` (`quant=`) a layer holds `qweight` and `scales` (kernels/quant.py's format) instead
of `weight`: never a float copy. Their `weight_loader`s shard pre-quantized tensors like the float
weight; `load_float_weight` quantizes each part of this rank's shard of a float weight as it loads.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels.activation import FUSABLE_ACTIVATIONS
from kernels.dispatch import use_triton
from kernels.dequant import DEQUANT_MIN_ROWS
from kernels.gemv import NormFold, Tile
from kernels import gemv_tuner
from kernels.gemv_tuner import TUNED_MAX_ROWS, streamed_linear
from kernels import allreduce
from kernels.quant import QuantSpec, dequantize, quant_linear

# Float products of at most this many rows (decode batches) stream the weight through kernels/gemv.py
# on CUDA where its tuner (kernels/gemv_tuner.py) measured that faster than cuBLAS (with its
# separate epilogue ops); larger float products always take cuBLAS. Quantized weights always take
# the Triton kernels.
CUBLAS_EPILOGUES = ("gelu_tanh", "relu")       # activations cuBLASLt applies after the bias (`_torch_matmul`)
SKINNY_MAX_ROWS = int(os.environ.get("RAYSPEED_SKINNY_MAX_ROWS", str(TUNED_MAX_ROWS)))
# Decode products whose tile can (`Tile.takes_norm`) do the norm before them instead of a norm kernel
# (`_Linear.norm_fold`); RAYSPEED_FOLD_NORMS=0 keeps the norm kernels.
FOLD_NORMS = os.environ.get("RAYSPEED_FOLD_NORMS", "1") != "0"
FOLD_ROWS = 4096           # weight rows dequantized to fp32 at a time to prepare a fold (64 MB at K = 4,096)


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in its tensor-parallel group (group None = the default group). `host_group`:
    a gloo group over the same ranks for small host-to-host messages (None: `group` is gloo already)."""
    rank: int = 0
    size: int = 1
    group: object = None
    host_group: object = None

    def all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """The reduction over the group: in place through NCCL, or (opt-in, small sums on CUDA) a new
        tensor from the symmetric-memory one-shot all-reduce (kernels/allreduce.py)."""
        if self.size == 1:
            return x
        if op == dist.ReduceOp.SUM and allreduce.enabled():
            out = allreduce.all_reduce(x, self.group)
            if out is not None:
                return out
        dist.all_reduce(x, op=op, group=self.group)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """In place, from the group's rank 0."""
        if self.size > 1:
            dist.broadcast(x, group=self.group, group_src=0)
        return x

    def broadcast_host(self, x: torch.Tensor) -> torch.Tensor:
        """A CPU tensor, in place, from the group's rank 0 through `host_group`: it reaches the other
        ranks' hosts without a wait on their GPUs (an NCCL broadcast read on the host would wait for
        everything queued before it)."""
        if self.size > 1:
            dist.broadcast(x, group=self.host_group or self.group, group_src=0)
        return x

    def broadcast_object(self, obj=None):
        """A picklable object from the group's rank 0 (returned on every rank)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def shard(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous slice of `full` along `dim`."""
        if full.shape[dim] % self.size:
            raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split into {self.size} shards")
        size = full.shape[dim] // self.size
        return full.narrow(dim, self.rank * size, size)


SINGLE = TensorParallel()


def host_group(device: torch.device, timeout) -> object:
    """A gloo group of every rank beside an NCCL world (call on every rank, in the same order as other
    group creations); None on CPU, where the world is gloo already."""
    if device.type != "cuda" or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=timeout)


def copy_checked(param: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy `loaded` into `param`; a lazy checkpoint view (it has `materialize`) is read only now."""
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint gives {tuple(loaded.shape)}")
    if hasattr(loaded, "materialize"):
        loaded = loaded.materialize()
    with torch.no_grad():
        param.copy_(loaded)


def default_weight_loader(param: torch.Tensor, full: torch.Tensor, shard_id=None) -> None:
    """Replicated parameters: the whole tensor, shape-checked."""
    copy_checked(param, full)


def _param(*shape: int, dtype: torch.dtype, loader, tp_dim: int | None = None,
           data: torch.Tensor | None = None) -> nn.Parameter:
    """An uninitialised parameter (or one over `data`) with its loader; `tp_dim` is the dimension split
    across ranks (None: replicated), which is what sharded checkpoints need to know."""
    p = nn.Parameter(torch.empty(*shape, dtype=dtype) if data is None else data, requires_grad=False)
    p.weight_loader = loader
    p.tp_dim = tp_dim
    return p


@dataclass(frozen=True)
class Fold:
    """A norm done inside a product (`_Linear.norm_fold`): the kernel's part, and the product's bias
    with the norm's folded in."""
    norm: NormFold
    bias: torch.Tensor | None


class QuantizedRows:
    """A quantized weight seen as the float [rows, K] weight it replaces, for the float weight loaders:
    `narrow(0, ...)` selects rows (a part), `copy_(w)` quantizes w into those rows of qweight/scales."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, start: int = 0,
                 rows: int | None = None):
        self.qweight, self.scales, self.spec, self.start = qweight, scales, spec, start
        self.rows = qweight.shape[0] if rows is None else rows
        self.shape = torch.Size((self.rows, qweight.shape[1] * (2 if spec.bits == 4 else 1)))

    def narrow(self, dim: int, start: int, size: int) -> "QuantizedRows":
        if dim != 0:
            raise ValueError("a quantized weight is written by output rows")
        return QuantizedRows(self.qweight, self.scales, self.spec, self.start + start, size)

    def copy_(self, w: torch.Tensor) -> None:
        q, scales = self.spec.quantize(w.to(self.qweight.device), self.scales.dtype)
        self.qweight[self.start:self.start + self.rows] = q
        self.scales[self.start:self.start + self.rows] = scales


class _Linear(nn.Module):
    """The weight (float, or quantized) of a parallel linear, and its matmul."""

    def _init_weight(self, n: int, k: int, dtype: torch.dtype, tp_dim: int, quant: QuantSpec | None) -> None:
        self.quant = quant
        if quant is None:
            self.weight = _param(n, k, dtype=dtype, loader=self.weight_loader, tp_dim=tp_dim)
            return
        quant.check(type(self).__name__, self._part_rows(n), k)
        qshape, sshape = quant.shapes(n, k)
        self.group_size = quant.k_group(k)
        self.qweight = _param(*qshape, dtype=quant.storage_dtype, loader=self.weight_loader, tp_dim=tp_dim)
        self.scales = _param(*sshape, dtype=dtype, loader=self.weight_loader, tp_dim=tp_dim)

    def _part_rows(self, rows: int) -> list[int]:
        return [rows]

    def load_float_weight(self, full: torch.Tensor, shard_id=None) -> None:
        """A float checkpoint weight, quantized part by part (this rank's shard) into qweight/scales."""
        self.weight_loader(QuantizedRows(self.qweight, self.scales, self.quant), full, shard_id)

    @property
    def stored(self) -> torch.Tensor:
        """The weight as stored: float, or the quantized values."""
        return self.weight if self.quant is None else self.qweight

    def _streams(self, x: torch.Tensor) -> bool:
        """Whether this product runs in the weight-streaming Triton kernels at x's rows."""
        bits = 16 if self.quant is None else self.quant.bits
        rows = x.numel() // x.shape[-1]
        return use_triton(x) and (rows < DEQUANT_MIN_ROWS[bits] if bits < 16 else rows <= SKINNY_MAX_ROWS)

    def norm_fold(self, x: torch.Tensor, norm, activation: str | None = None) -> "Fold | None":
        """`norm` (a LayerNorm or RMSNorm module: kind, weight, bias, eps) done inside this product at
        x's rows, or None where its tile cannot (`Tile.takes_norm`, the tuner's choice for the
        product as it would run with the folded bias). What the fold needs, c1 = W g and the norm's
        bias through the weight, W b_norm, is computed from the (dequantized) weight once per weights
        and norm, and never while a CUDA graph is being captured (the product then runs after a
        norm kernel, as without the fold)."""
        if not FOLD_NORMS or norm.weight.dtype != x.dtype or not self._streams(x):
            return None
        fold = self._prepared_fold(norm)
        if fold is None:
            return None
        bits = 16 if self.quant is None else self.quant.bits
        weight, scales = (self.weight, None) if bits == 16 else (self.qweight, self.scales)
        torch_path = (lambda v, w: self._torch_matmul(v, fold.bias, activation, None, w)) if bits == 16 else None
        group_size = None if bits == 16 else self.group_size
        tile = gemv_tuner.tuned_tile(x, weight, fold.bias, scales, bits, group_size, activation, None, torch_path)
        return fold if isinstance(tile, Tile) and tile.takes_norm else None

    def _prepared_fold(self, norm) -> "Fold | None":
        params = (self.weight,) if self.quant is None else (self.qweight, self.scales)
        params += (self.bias, norm.weight, norm.bias)
        key = tuple(None if p is None else (p.data_ptr(), p._version) for p in params)
        cached = getattr(self, "_fold", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        if norm.weight.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        layer = norm.kind == "layer"
        shifted = layer and norm.bias is not None and bool(norm.bias.any())
        stored = self.stored
        c1 = torch.empty(stored.shape[0], dtype=torch.float32, device=stored.device) if layer else None
        shift = torch.empty_like(c1) if shifted else None
        with torch.no_grad():
            for start in range(0, stored.shape[0], FOLD_ROWS):        # fp32 rows a slice at a time
                rows = slice(start, start + FOLD_ROWS)
                w = (stored[rows].float() if self.quant is None else
                     dequantize(stored[rows], self.scales[rows], self.quant.bits, self.group_size, torch.float32))
                if layer:
                    c1[rows] = w @ norm.weight.float()
                if shifted:
                    shift[rows] = w @ norm.bias.float()
        bias = self.bias
        if shifted:
            bias = (shift if bias is None else bias.float() + shift).to(norm.weight.dtype)
        fold = Fold(NormFold(norm.weight.detach().contiguous(), c1, norm.eps), bias)
        self._fold = (key, fold)
        return fold

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
                residual: torch.Tensor | None = None, norm: NormFold | None = None) -> torch.Tensor:
        """act(x W^T + bias) + residual. On CUDA, float weights at decode batches and quantized weights
        below DEQUANT_MIN_ROWS go through the weight-streaming Triton kernels with the epilogue fused,
        unless the tuner measured cuBLAS (plus separate epilogue ops) faster for this shape; larger
        quantized products dequantize the weight once and run cuBLAS (`quant_linear`). `norm`: from
        `norm_fold`, x is the stream before that norm."""
        bits = 16 if self.quant is None else self.quant.bits
        if self._streams(x):
            weight, scales = (self.weight, None) if bits == 16 else (self.qweight, self.scales)
            group_size = None if bits == 16 else self.group_size
            torch_path = (lambda v, w: self._torch_matmul(v, bias, activation, residual, w)) if bits == 16 else None
            return streamed_linear(x, weight, bias, scales, bits, group_size, activation, residual, torch_path,
                                   norm=norm)
        assert norm is None, "the norm rides only in the weight-streaming kernels"
        return self._torch_matmul(x, bias, activation, residual)

    def _torch_matmul(self, x: torch.Tensor, bias, activation: str | None, residual,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
        """`weight`: the float weight's stand-in (the tuner times copies of it). On CUDA a tanh GELU or a
        ReLU after a bias rides in cuBLASLt's epilogue (`torch._addmm_activation`; its GELU is the
        tanh form, computed on the fp32 accumulator) instead of a kernel of its own."""
        if self.quant is None:
            w = self.weight if weight is None else weight
            if x.is_cuda and bias is not None and activation in CUBLAS_EPILOGUES:
                y = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), w.t(),
                                            use_gelu=activation == "gelu_tanh").view(*x.shape[:-1], -1)
                return y if residual is None else y + residual
            y = F.linear(x, w, bias)
        else:
            y = quant_linear(x, self.qweight, self.scales, self.quant.bits, self.group_size, bias)
        if activation is not None:
            y = FUSABLE_ACTIVATIONS[activation](y)
        return y if residual is None else y + residual


class ColumnParallelLinear(_Linear):
    """y = x W^T + b with W's rows (output features) split across ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel, dtype: torch.dtype,
                 quant: QuantSpec | None = None):
        super().__init__()
        if out_features % tp.size:
            raise ValueError(f"{out_features} output features do not split across tp_size={tp.size}")
        self.tp = tp
        self._init_weight(out_features // tp.size, in_features, dtype, 0, quant)
        self.bias = _param(out_features // tp.size, dtype=dtype, loader=self.weight_loader, tp_dim=0) if bias else None

    def weight_loader(self, param: torch.Tensor, full: torch.Tensor, shard_id=None) -> None:
        copy_checked(param, self.tp.shard(full, 0))

    def forward(self, x: torch.Tensor, activation: str | None = None, fold: Fold | None = None) -> torch.Tensor:
        """`activation`: a name in kernels.activation.FUSABLE_ACTIVATIONS, applied in the epilogue.
        `fold` (`norm_fold`'s, at x's rows): x is the stream before that norm, done inside the product."""
        if fold is None:
            return self._matmul(x, self.bias, activation)
        return self._matmul(x, fold.bias, activation, norm=fold.norm)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up of a SwiGLU MLP).
    Each rank holds its slice of every part, parts side by side: [gate_shard; up_shard]."""

    def __init__(self, in_features: int, part_sizes: list[int], bias: bool, tp: TensorParallel, dtype: torch.dtype,
                 quant: QuantSpec | None = None):
        self.part_sizes = [size // tp.size for size in part_sizes]
        super().__init__(in_features, sum(part_sizes), bias, tp, dtype, quant)

    def _part_rows(self, rows: int) -> list[int]:
        return self.part_sizes

    def weight_loader(self, param: torch.Tensor, full: torch.Tensor, shard_id: int | None = None) -> None:
        if shard_id is None:                         # checkpoint stores the parts already merged
            for i, part in enumerate(full.split([s * self.tp.size for s in self.part_sizes])):
                self.weight_loader(param, part, i)
            return
        start = sum(self.part_sizes[:shard_id])
        copy_checked(param.narrow(0, start, self.part_sizes[shard_id]), self.tp.shard(full, 0))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projection; heads split across ranks. With fewer KV heads than ranks each
    KV head is replicated on tp_size / num_kv_heads ranks (grouped-query attention)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TensorParallel, dtype: torch.dtype, quant: QuantSpec | None = None):
        if num_heads % tp.size:
            raise ValueError(f"num_heads={num_heads} is not divisible by tp_size={tp.size}")
        if num_kv_heads % tp.size and tp.size % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} and tp_size={tp.size}: one must divide the other")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, out * tp.size, bias, tp, dtype, quant)

    def _part_rows(self, rows: int) -> list[int]:
        return self.sizes

    @property
    def sizes(self) -> list[int]:
        return [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim]

    def weight_loader(self, param: torch.Tensor, full: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id is None:                         # fused [q; k; v] along the output dimension
            kv = (full.shape[0] - self.num_heads * self.tp.size * self.head_dim) // 2
            for part, name in zip(full.split([full.shape[0] - 2 * kv, kv, kv]), "qkv"):
                self.weight_loader(param, part, name)
            return
        index = "qkv".index(shard_id)
        start, size = sum(self.sizes[:index]), self.sizes[index]
        if shard_id == "q":
            shard = self.tp.shard(full, 0)
        else:                                       # KV heads: rank r holds head r // kv_replicas
            rank = self.tp.rank // self.kv_replicas
            shard = full.narrow(0, rank * size, size)
        copy_checked(param.narrow(0, start, size), shard)

    def forward(self, x: torch.Tensor, fold: Fold | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().forward(x, fold=fold).split(self.sizes, dim=-1)
        return (q.unflatten(-1, (self.num_heads, self.head_dim)),       # [tokens, heads, head_dim]
                k.unflatten(-1, (self.num_kv_heads, self.head_dim)),
                v.unflatten(-1, (self.num_kv_heads, self.head_dim)))


class RowParallelLinear(_Linear):
    """y = all_reduce(x_shard W_shard^T) + b with W's columns (input features) split across ranks.
    Quantized, each rank's scales cover its own K columns: `scales` split along dim 1 as well."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel, dtype: torch.dtype,
                 quant: QuantSpec | None = None):
        super().__init__()
        if in_features % tp.size:
            raise ValueError(f"{in_features} input features do not split across tp_size={tp.size}")
        self.tp = tp
        self._init_weight(out_features, in_features // tp.size, dtype, 1, quant)
        self.bias = _param(out_features, dtype=dtype, loader=default_weight_loader) if bias else None

    def weight_loader(self, param: torch.Tensor, full: torch.Tensor, shard_id=None) -> None:
        copy_checked(param, self.tp.shard(full, 1))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """all_reduce(x W^T) + bias + residual; rank 0 adds bias and residual to its partial sum
        before the all-reduce, so the epilogue fuses at any tp_size."""
        lead = self.tp.rank == 0
        return self.tp.all_reduce(self._matmul(x, self.bias if lead else None,
                                               residual=residual if lead else None))
