"""Zeroed int32 tickets for kernels whose programs share out one result: each program adds its part,
takes a ticket (an atomic add), and the one holding the last ticket merges the parts in a fixed
order and resets the ticket to zero, so one kernel does what a second, merging kernel would (split
decode attention, kernels/attention.py; split-K matmuls, kernels/gemv.py).

One buffer per (user, device), allocated once outside any CUDA graph capture and zero between
kernels. Two kernels of one user must not run at once on a device (they would share tickets): the
engine issues them one after another on one stream, and programmatic dependent launch overlaps a
kernel with the one before only up to its wait (kernels/pdl.py), which comes before any ticket."""
import torch

_BUFFERS: dict[tuple[str, torch.device], torch.Tensor] = {}


def tickets(user: str, count: int, device: torch.device, size: int) -> torch.Tensor | None:
    """`user`'s `size` tickets on `device` when `count` of them are needed; None where there are too
    few, or where the buffer does not exist yet and cannot be made (inside a CUDA graph capture)."""
    key = (user, device)
    buffer = _BUFFERS.get(key)
    if buffer is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buffer = _BUFFERS[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return buffer if count <= buffer.numel() else None
