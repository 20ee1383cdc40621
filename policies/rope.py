"""Rotary frequencies from an HF config, for every RoPE variant transformers knows but `dynamic`
(whose frequencies change with the sequence length, which a fixed cos/sin cache cannot follow)."""
import torch


def rope_parameters(c) -> dict:
    """transformers >= 5 keeps `rope_parameters`; older configs split `rope_theta` and `rope_scaling`."""
    params = dict(getattr(c, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(c, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(c, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_frequencies(c, head_dim: int, partial: float = 1.0) -> tuple[tuple[float, ...], float]:
    """(inverse frequencies, cos/sin scaling) for the rotated part of each head."""
    params = rope_parameters(c)
    kind = params["rope_type"]
    rotary_dim = int(head_dim * partial)
    if kind == "default":
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
        return tuple((1.0 / params["rope_theta"] ** exponents).tolist()), 1.0
    if kind == "dynamic":
        raise ValueError("rope_type='dynamic' is not supported (frequencies depend on the sequence length)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    if kind not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope_type {kind!r}; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](c, "cpu")
    return tuple(inv_freq.float().tolist()), float(scaling)
