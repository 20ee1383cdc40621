"""AutoTP: tensor parallelism for HF models as they are, without kernel injection (DeepSpeed's
`injection_policy={Block: ("row.linear.names", ...)}`). The one module that rewrites foreign modules.

Inside each block of the policy, the named linears become row-parallel (`AutoTPRowLinear`: input
features split, partial sums all-reduced in `forward`, bias added once) and every other `nn.Linear`
or `Conv1D` becomes column-parallel (`AutoTPColumnLinear`: output features split). Rank r keeps
heads [r*h/tp, (r+1)*h/tp) of every attention module, whose head counts are then set to the per-rank
values its `forward` reads; per-head tables (T5's relative attention bias) are split too, and with
fewer key/value heads than ranks (Llama family) each KV head is replicated on tp/kv ranks. Embeddings,
norms, the LM head and everything else outside the blocks stay replicated. A name matches a linear
when it equals the linear's path inside the block or is a dotted suffix of it ("output.dense"
matches "attention.output.dense" and "output.dense").
"""
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from kernels.linear import TensorParallel

# attributes that count heads, or head-sized features, on the attention modules of known families
DEFAULT_HEAD_ATTRS = ("n_heads", "inner_dim", "num_heads", "num_attention_heads", "all_head_size",
                      "split_size", "num_key_value_heads")
_HEAD_DIM_ATTRS = ("head_dim", "key_value_proj_dim", "attention_head_size", "head_size")


class AutoTPError(ValueError):
    """A policy that does not fit the model, or a size that does not split across the TP group."""


@dataclass(frozen=True)
class BlockLayout:
    """How one HF block family splits across ranks."""
    rows: tuple[str, ...]                              # linears whose outputs are summed into the residual
    head_attrs: tuple[str, ...] = DEFAULT_HEAD_ATTRS   # per-rank values set on the attention modules
    fused: tuple[tuple[str, int], ...] = ()            # (linear, parts): [q|k|v] side by side on the output dim
    head_tables: tuple[str, ...] = ()                  # embeddings with one column per head
    kv: tuple[str, ...] = ()                           # key/value linears, replicated when heads < ranks
    kv_groups: str | None = None                       # query heads per key/value head, on the attention


# Llama's attention reads no head count (views use -1); with fewer KV heads than ranks each KV head
# is replicated on tp/kv ranks and the per-rank query heads per KV head shrink to match
_LLAMA_LIKE = BlockLayout(rows=("self_attn.o_proj", "mlp.down_proj"), head_attrs=(),
                          kv=("self_attn.k_proj", "self_attn.v_proj"), kv_groups="num_key_value_groups")
KNOWN_BLOCKS: dict[str, BlockLayout] = {
    "T5Block": BlockLayout(rows=("SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo"),
                           head_attrs=("n_heads", "inner_dim"), head_tables=("relative_attention_bias",)),
    # "output.dense": the attention's BertSelfOutput.dense (also under crossattention) and BertOutput.dense
    "BertLayer": BlockLayout(rows=("output.dense",), head_attrs=("num_attention_heads", "all_head_size")),
    "RobertaLayer": BlockLayout(rows=("output.dense",), head_attrs=("num_attention_heads", "all_head_size")),
    # "c_proj": attn.c_proj, crossattention.c_proj and mlp.c_proj (all Conv1D)
    "GPT2Block": BlockLayout(rows=("c_proj",), head_attrs=("num_heads", "split_size"),
                             fused=(("attn.c_attn", 3), ("crossattention.c_attn", 2))),
    "GPTNeoBlock": BlockLayout(rows=("attn.attention.out_proj", "mlp.c_proj"), head_attrs=("num_heads",)),
    "GPTJBlock": BlockLayout(rows=("attn.out_proj", "mlp.fc_out"), head_attrs=("num_attention_heads",)),
    # query_key_value is [q|k|v] per head ([heads, 3, head_size]): a plain column split keeps whole heads
    "GPTNeoXLayer": BlockLayout(rows=("attention.dense", "mlp.dense_4h_to_h"), head_attrs=()),
    "OPTDecoderLayer": BlockLayout(rows=("self_attn.out_proj", "fc2"), head_attrs=("num_heads",)),
    "LlamaDecoderLayer": _LLAMA_LIKE, "MistralDecoderLayer": _LLAMA_LIKE, "Qwen2DecoderLayer": _LLAMA_LIKE,
    "PhiDecoderLayer": replace(_LLAMA_LIKE, rows=("self_attn.dense", "mlp.fc2")),
}


class AutoTPColumnLinear(nn.Module):
    """y = x W_r^T + b_r: this rank's slice of the output features; no communication."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)              # [out / tp, in]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class AutoTPRowLinear(nn.Module):
    """y = all_reduce(x_r W_r^T) + b: this rank's slice of the input features, partial sums
    all-reduced across the TP group, the (replicated) bias added once after the sum."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)              # [out, in / tp]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


@dataclass(frozen=True)
class _Swap:
    """One linear of one block to replace: where it hangs, and how it splits."""
    path: str                  # inside the block
    parent: nn.Module
    attr: str
    linear: nn.Module
    row: bool
    parts: int = 1             # fused parts, each split on its own
    replicas: int = 1          # ranks holding the same shard (key/value heads fewer than ranks)


def shard_in_place(model: nn.Module, tp: TensorParallel, policy: dict | None = None) -> nn.Module:
    """Shard `model`'s blocks for `tp.rank` of `tp.size` ranks, in place; returns the model.
    `policy`: {block class or class name: (row-parallel linear names, ...)}; None infers it for the
    known families (`KNOWN_BLOCKS`). Everything is checked before the first module is touched."""
    swaps, heads, tables = plan(model, tp, policy)
    for swap in swaps:
        setattr(swap.parent, swap.attr, _build(swap, tp))
    for module, attr, divisor in heads:
        setattr(module, attr, getattr(module, attr) // divisor)
    for table in tables:
        shard = _split(table.weight.detach(), 1, tp).clone(memory_format=torch.contiguous_format)
        table.weight = nn.Parameter(shard, requires_grad=False)
        table.embedding_dim = table.weight.shape[1]
    return model


def plan(model: nn.Module, tp: TensorParallel, policy: dict | None = None):
    """The replacements `shard_in_place` makes, validated: (linear swaps, (module, head attr, divisor),
    head tables). With `tp.size == 1` this only checks the policy against the model."""
    if any(isinstance(m, (AutoTPColumnLinear, AutoTPRowLinear)) for m in model.modules()):
        raise AutoTPError(f"{type(model).__name__} is already sharded by AutoTP")
    layouts = _layouts(model, policy)
    swaps, heads, tables, matched = [], [], [], set()
    for path, block in _blocks(model, layouts):
        key = _key_of(block, layouts)
        layout = layouts[key]
        block_swaps = _block_swaps(path, block, layout, tp)
        matched.update((key, n) for n in layout.rows for s in block_swaps if s.row and _matches(s.path, n))
        swaps += block_swaps
        heads += _head_attrs(path, block, layout, tp) + _kv_groups(block_swaps, layout)
        tables += _head_tables(path, block, layout, tp)
    if policy is not None:
        _check_all_matched(model, layouts, matched)
    return swaps, heads, tables


def _layouts(model: nn.Module, policy: dict | None) -> dict:
    """{policy key: BlockLayout}; a user policy keeps a known family's head knobs, with its own rows."""
    if policy is None:
        found = {type(m).__name__ for m in model.modules()} & set(KNOWN_BLOCKS)
        if not found:
            raise AutoTPError(_unknown_architecture(model))
        return {name: KNOWN_BLOCKS[name] for name in found}
    if not policy:
        raise AutoTPError("injection_policy is empty: give {BlockClass: ('row.linear.names', ...)}, "
                          "or None to infer it")
    layouts = {}
    for key, rows in policy.items():
        name = key if isinstance(key, str) else key.__name__
        rows = (rows,) if isinstance(rows, str) else tuple(rows)
        layouts[key] = replace(KNOWN_BLOCKS.get(name.rsplit(".", 1)[-1], BlockLayout(())), rows=rows)
    return layouts


def _key_of(module: nn.Module, layouts: dict):
    cls = type(module)
    for key in layouts:
        if key is cls or key in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}"):
            return key
    return None


def _blocks(model: nn.Module, layouts: dict) -> list[tuple[str, nn.Module]]:
    """The outermost modules whose class is a policy key (a block inside a block is sharded once)."""
    blocks = []
    for path, module in model.named_modules():
        inside = any(path.startswith(outer + ".") for outer, _ in blocks)
        if not inside and _key_of(module, layouts) is not None:
            blocks.append((path, module))
    missing = [k for k in layouts if not any(_key_of(b, {k: None}) is not None for _, b in blocks)]
    if missing:
        raise AutoTPError(f"injection_policy names {_name(missing[0])}, but {type(model).__name__} has no such "
                          f"module; its repeated block is {_repeated_block(model) or 'not recognisable'}")
    return blocks


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def _block_swaps(block_path: str, block: nn.Module, layout: BlockLayout, tp: TensorParallel) -> list[_Swap]:
    swaps = []
    for path, module in block.named_modules():
        if not _is_linear(module):
            continue
        parent_path, _, attr = path.rpartition(".")
        swap = _Swap(path, block.get_submodule(parent_path), attr, module,
                     row=any(_matches(path, name) for name in layout.rows),
                     parts=next((n for name, n in layout.fused if _matches(path, name)), 1))
        kv = any(_matches(path, name) for name in layout.kv)
        swaps.append(replace(swap, replicas=_replicas(f"{_where(block_path, block)}: {path}", swap, kv, tp)))
    return swaps


def _replicas(where: str, swap: _Swap, kv: bool, tp: TensorParallel) -> int:
    """Checks that the sizes split evenly and shards hold whole heads (q, k and v of the same heads, the
    output projection's inputs from them); returns how many ranks hold the same shard (1, or tp/heads
    for key/value heads)."""
    out_features, in_features = _linear_weight(swap.linear).shape
    size = in_features if swap.row else out_features // swap.parts
    head_dim = next((d for d in (getattr(swap.parent, a, None) for a in _HEAD_DIM_ATTRS) if isinstance(d, int)), None)
    if head_dim and size % head_dim == 0:
        heads = size // head_dim
        if heads % tp.size == 0:
            return 1
        if kv and tp.size % heads == 0:
            return tp.size // heads
        raise AutoTPError(f"{where}: {heads} heads of {head_dim} do not split across tp_size={tp.size}"
                          + (", and tp_size is not a multiple of them" if kv else ""))
    if size % tp.size:
        kind = "input features (row-parallel)" if swap.row else "output features (column-parallel)"
        raise AutoTPError(f"{where}: {size} {kind} do not split across tp_size={tp.size}")
    return 1


def _kv_groups(swaps: list[_Swap], layout: BlockLayout) -> list:
    """With key/value heads replicated r times, each rank has r times fewer query heads per KV head."""
    replicated = {id(s.parent): s for s in swaps if s.replicas > 1}
    return [(s.parent, layout.kv_groups, s.replicas) for s in replicated.values()]


def _head_attrs(block_path: str, block: nn.Module, layout: BlockLayout, tp: TensorParallel) -> list:
    found = []
    for path, module in block.named_modules():
        for attr in layout.head_attrs:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                if value % tp.size:
                    raise AutoTPError(f"{_where(block_path, block)}: {path or 'the block'}.{attr}={value} does "
                                      f"not split across tp_size={tp.size}")
                found.append((module, attr, tp.size))
    return found


def _head_tables(block_path: str, block: nn.Module, layout: BlockLayout, tp: TensorParallel) -> list:
    tables = [m for path, m in block.named_modules() if isinstance(m, nn.Embedding)
              and any(_matches(path, name) for name in layout.head_tables)]
    for table in tables:
        if table.embedding_dim % tp.size:
            raise AutoTPError(f"{_where(block_path, block)}: a per-head table of {table.embedding_dim} heads "
                              f"does not split across tp_size={tp.size}")
    return tables


def _check_all_matched(model: nn.Module, layouts: dict, matched: set) -> None:
    for key, layout in layouts.items():
        for name in layout.rows:
            if (key, name) not in matched:
                block = next(m for m in model.modules() if _key_of(m, {key: None}) is not None)
                linears = ", ".join(p for p, m in block.named_modules() if _is_linear(m))
                raise AutoTPError(f"injection_policy[{_name(key)}] names {name!r}, but no linear in "
                                  f"{_name(key)} matches it; its linears are: {linears}")


def _build(swap: _Swap, tp: TensorParallel) -> nn.Module:
    """The replacement module: this rank's shard, cloned so the full weight can be freed."""
    weight, bias = _linear_weight(swap.linear).detach(), swap.linear.bias
    bias = None if bias is None else bias.detach()
    if swap.row:
        shard = _split(weight, 1, tp).clone(memory_format=torch.contiguous_format)
        return AutoTPRowLinear(shard, None if bias is None else bias.clone(), tp)
    def column(full):                                # each fused part split on its own, parts kept in order
        return torch.cat([_split(part, 0, tp, swap.replicas) for part in full.chunk(swap.parts, 0)])
    return AutoTPColumnLinear(column(weight), None if bias is None else column(bias))


def _linear_weight(linear: nn.Module) -> torch.Tensor:
    """[out, in] for either layout (GPT-2's Conv1D stores [in, out])."""
    return linear.weight.t() if isinstance(linear, Conv1D) else linear.weight


def _split(full: torch.Tensor, dim: int, tp: TensorParallel, replicas: int = 1) -> torch.Tensor:
    """This rank's slice along `dim`; with replicas, ranks r*replicas .. (r+1)*replicas-1 share slice r."""
    size = full.shape[dim] // (tp.size // replicas)
    return full.narrow(dim, tp.rank // replicas * size, size)


def _name(key) -> str:
    return key if isinstance(key, str) else key.__name__


def _where(block_path: str, block: nn.Module) -> str:
    return f"{type(block).__name__} '{block_path}'"


def _repeated_block(model: nn.Module) -> str | None:
    """The class of the outermost (then longest) `nn.ModuleList`'s elements: what a policy's key should be."""
    lists = [(p.count("."), -len(m), m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and m]
    return type(min(lists, key=lambda t: t[:2])[2][0]).__name__ if lists else None


def _unknown_architecture(model: nn.Module) -> str:
    block = _repeated_block(model)
    hint = ""
    if block:
        first = next(m for m in model.modules() if type(m).__name__ == block)
        hint = f"; its linears: {', '.join(p for p, m in first.named_modules() if _is_linear(m))}"
    return (f"AutoTP cannot infer the row-parallel linears of {type(model).__name__} (known blocks: "
            f"{', '.join(sorted(KNOWN_BLOCKS))}). Pass injection_policy={{{block or 'BlockClass'}: "
            f"('attention.out_proj', 'mlp.down_proj')}} naming the linears whose outputs go into the residual "
            f"stream (attention output and MLP output projections){hint}")
