"""One rule for choosing between a Triton kernel and its torch reference."""
import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    """Triton on CUDA tensors (unless RAYSPEED_DISABLE_TRITON=1); the torch reference elsewhere."""
    return x.is_cuda and triton_available() and os.environ.get("RAYSPEED_DISABLE_TRITON") != "1"
