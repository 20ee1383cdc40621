"""A policy: how one model family's HF checkpoint maps onto the injected `CausalLM`.

Declarative on purpose: a `spec` function that reads the HF config, and weight rules that
rename HF tensors to injected parameters (with the shard id of a fused layer, a transpose for
GPT-2's Conv1D, and a layout `transform` such as NeoX's per-head QKV). Which injected parameters
are column- or row-parallel is fixed by the layer they land in (`attn.qkv`, `mlp.up`: column;
`attn.out`, `mlp.down`: row).
"""
import re
from dataclasses import dataclass, field
from typing import Callable

from kernels.spec import ModelSpec

Transform = Callable[[object, ModelSpec], object]     # tensors may be lazy checkpoint views


@dataclass(frozen=True)
class WeightRule:
    hf: str                          # HF name, `{i}` standing for the layer index
    ours: str                        # injected parameter name, same `{i}`
    shard: str | int | None = None   # part of a fused layer: "q"/"k"/"v", or 0/1 for gate/up
    transpose: bool = False          # stored as [in, out] (GPT-2's Conv1D)
    transform: Transform | None = None   # (full tensor, spec) -> full tensor, after the transpose


@dataclass(frozen=True)
class WeightTarget:
    name: str
    shard: str | int | None
    transpose: bool
    transform: Transform | None = None


@dataclass(frozen=True)
class Policy:
    name: str
    model_types: tuple[str, ...]                 # HF `config.model_type` values served
    spec: Callable[[object], ModelSpec]          # HF config -> ModelSpec
    rules: tuple[WeightRule, ...]
    prefixes: tuple[str, ...] = ()               # leading module names a base model saved alone lacks
    # HF's forward numbers a left-padded row's positions from its first real token (OPT's cumsum of
    # the attention mask), not by column as the other families do
    positions_from_mask: bool = False
    _compiled: list = field(default=None, init=False, repr=False, compare=False)

    def _patterns(self) -> list[tuple[re.Pattern, WeightRule]]:
        if self._compiled is None:
            compiled = [(re.compile("^" + re.escape(r.hf).replace(r"\{i\}", r"(\d+)") + "$"), r) for r in self.rules]
            object.__setattr__(self, "_compiled", compiled)
        return self._compiled

    def target(self, hf_name: str) -> WeightTarget | None:
        """Where an HF tensor goes in the injected model, or None if it has no place there."""
        for name in (hf_name, *(prefix + hf_name for prefix in self.prefixes)):
            for pattern, rule in self._patterns():
                if m := pattern.match(name):
                    ours = rule.ours.replace("{i}", m.group(1)) if m.groups() else rule.ours
                    return WeightTarget(ours, rule.shard, rule.transpose, rule.transform)
        return None


def layer_rules(hf_prefix: str, names: dict[str, str | tuple]) -> tuple[WeightRule, ...]:
    """Rules for per-layer tensors: {hf_suffix: ours_suffix | (ours_suffix, shard[, transpose[, transform]])}."""
    rules = []
    for hf, target in names.items():
        ours, *rest = (target,) if isinstance(target, str) else target
        rules.append(WeightRule(f"{hf_prefix}.{{i}}.{hf}", f"layers.{{i}}.{ours}", *rest))
    return tuple(rules)


def heads_to_qkv(fused, spec: ModelSpec):
    """A fused QKV weight or bias stored per head, [heads, 3, head_dim, ...] (GPT-NeoX, BLOOM),
    as [q; k; v] for `QKVParallelLinear.weight_loader`. Every rank needs rows from the whole tensor
    for this, so a lazy checkpoint view is read whole here (by each rank)."""
    if hasattr(fused, "materialize"):
        fused = fused.materialize()
    if fused.shape[0] != 3 * spec.num_heads * spec.head_dim or spec.num_kv_heads != spec.num_heads:
        raise ValueError(f"per-head fused QKV of {fused.shape[0]} rows does not fit {spec.num_heads} heads "
                         f"(and as many KV heads) of size {spec.head_dim}")
    per_head = fused.unflatten(0, (spec.num_heads, 3, spec.head_dim))   # [heads, 3, head_dim, ...]
    return per_head.transpose(0, 1).flatten(0, 2)                       # [3 * heads * head_dim, ...]
