"""Activations by their HF config names (`hidden_act` / `activation_function`)."""
import torch
import torch.nn.functional as F


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


# Activations the matmul epilogue of kernels/gemv.py computes, by its names for them
FUSABLE_ACTIVATIONS = {"gelu_tanh": _gelu_tanh, "gelu": F.gelu, "relu": F.relu, "silu": F.silu}
FUSED_NAME = {"gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
              "relu": "relu", "silu": "silu", "swish": "silu"}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
