"""A policy: how one model family's HF checkpoint maps onto the injected `CausalLM`.

Declarative on purpose: a `spec` function that reads the HF config, and weight rules that
rename HF tensors to injected parameters (with the shard id of a fused layer, and a transpose
for GPT-2's Conv1D). Which injected parameters are column- or row-parallel is fixed by the
layer they land in (`attn.qkv`, `mlp.up`: column; `attn.out`, `mlp.down`: row).
"""
import re
from dataclasses import dataclass, field
from typing import Callable

from kernels.spec import ModelSpec


@dataclass(frozen=True)
class WeightRule:
    hf: str                          # HF name, `{i}` standing for the layer index
    ours: str                        # injected parameter name, same `{i}`
    shard: str | int | None = None   # part of a fused layer: "q"/"k"/"v", or 0/1 for gate/up
    transpose: bool = False          # stored as [in, out] (GPT-2's Conv1D)


@dataclass(frozen=True)
class WeightTarget:
    name: str
    shard: str | int | None
    transpose: bool


@dataclass(frozen=True)
class Policy:
    name: str
    model_types: tuple[str, ...]                 # HF `config.model_type` values served
    spec: Callable[[object], ModelSpec]          # HF config -> ModelSpec
    rules: tuple[WeightRule, ...]
    prefixes: tuple[str, ...] = ()               # leading module names a base model saved alone lacks
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
                    return WeightTarget(ours, rule.shard, rule.transpose)
        return None


def layer_rules(hf_prefix: str, names: dict[str, str | tuple]) -> tuple[WeightRule, ...]:
    """Rules for per-layer tensors: {hf_suffix: ours_suffix | (ours_suffix, shard[, transpose])}."""
    rules = []
    for hf, target in names.items():
        ours, shard, transpose = (target, None, False) if isinstance(target, str) else (*target, False)[:3]
        rules.append(WeightRule(f"{hf_prefix}.{{i}}.{hf}", f"layers.{{i}}.{ours}", shard, transpose))
    return tuple(rules)
