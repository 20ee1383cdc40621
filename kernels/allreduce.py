"""Small-message all-reduce over NVLink P2P with torch's symmetric memory, for decode steps where NCCL's
launch latency dominates: one-shot (each rank copies its input into its symmetric buffer, then every
rank reads all peers' buffers and sums). Opt-in with RAYSPEED_SYMM_ALLREDUCE=1. No multimem / NVLink
multicast (off on shared hosts). `all_reduce` returns None where the caller should use NCCL: not CUDA,
not a sum, over MAX_BYTES, or symmetric memory could not be set up (then on every rank alike).

The buffer is made at the group's first sum on CUDA (the eager warm-up, before CUDA-graph capture), so
captured decode graphs replay the one-shot kernel; nothing is set up during a capture."""
import os

import torch
import torch.distributed as dist

MAX_BYTES = 1 << 20           # decode: [batch, hidden] fp16 up to 256 x 2048, 128 x 4096
_buffers: dict = {}           # (group name, dtype, device) -> symmetric buffer, or None (NCCL)


def enabled() -> bool:
    return os.environ.get("RAYSPEED_SYMM_ALLREDUCE", "0") == "1"


def all_reduce(x: torch.Tensor, group=None) -> torch.Tensor | None:
    """The sum of `x` over `group` in a new tensor, or None (use NCCL)."""
    if x.device.type != "cuda" or not x.is_contiguous():
        return None
    name = (group or dist.group.WORLD).group_name
    key = (name, x.dtype, x.device)
    if key not in _buffers:
        if torch.cuda.is_current_stream_capturing():
            return None
        _buffers[key] = _setup(x.dtype, x.device, group or dist.group.WORLD)
    buffer = _buffers[key]
    if buffer is None or x.numel() * x.element_size() > MAX_BYTES:
        return None
    out = torch.empty_like(x)
    torch.ops.symm_mem.one_shot_all_reduce_copy_out(buffer[:x.numel()].view(x.shape), x, "sum", name, out)
    return out


def _setup(dtype: torch.dtype, device: torch.device, group) -> torch.Tensor | None:
    """A symmetric buffer of MAX_BYTES on every rank of `group`, or None on every rank."""
    buffer = None
    try:
        import torch.distributed._symmetric_memory as symm_mem
        if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
            raise RuntimeError("no one_shot_all_reduce_copy_out in this torch")
        if hasattr(symm_mem, "set_backend") and symm_mem.get_backend(device) is None:
            symm_mem.set_backend("CUDA")      # plain P2P over NVLink; not NVSHMEM
        buffer = symm_mem.empty(MAX_BYTES // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(buffer, group.group_name)
    except Exception as e:                    # noqa: BLE001  (any failure: NCCL instead, on every rank)
        print(f"rayspeed: symmetric-memory all-reduce unavailable, using NCCL: {e}", flush=True)
        buffer = None
    ok = torch.tensor([buffer is not None], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    return buffer if ok.item() else None
