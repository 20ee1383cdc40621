"""Small-message all-reduce over NVLink P2P with torch's symmetric memory, for decode steps where NCCL's
launch latency dominates: one-shot (each rank copies its input into its symmetric buffer, then every
rank reads all peers' buffers and sums). Opt-in with RAYSPEED_SYMM_ALLREDUCE=1. No multimem / NVLink
multicast (off on shared hosts). `all_reduce` returns None where the caller should use NCCL: not CUDA,
not a sum, over MAX_BYTES, or symmetric memory could not be set up (then on every rank alike).

torch's one-shot kernel sums fp32 and bf16 only (torch 2.11 raised "not implemented for 'Half'" on
2 x H200): fp16 is summed in fp32, between two casts, which also rounds once instead of per peer.

The buffer is made at the group's first sum on CUDA (the eager warm-up, before CUDA-graph capture), so
captured decode graphs replay the one-shot kernel; nothing is set up during a capture."""
import os

import torch
import torch.distributed as dist

MAX_BYTES = 1 << 20           # decode: [batch, hidden] summed in fp32 up to 128 x 2048, 64 x 4096
_buffers: dict = {}           # (group name, dtype, device) -> symmetric buffer, or None (NCCL)
_SUMMED = (torch.float32, torch.bfloat16)      # the dtypes torch's one-shot kernel sums


def enabled() -> bool:
    return os.environ.get("RAYSPEED_SYMM_ALLREDUCE", "0") == "1"


def all_reduce(x: torch.Tensor, group=None) -> torch.Tensor | None:
    """The sum of `x` over `group` in a new tensor, or None (use NCCL)."""
    if x.device.type != "cuda" or not x.is_contiguous():
        return None
    name = (group or dist.group.WORLD).group_name
    dtype = x.dtype if x.dtype in _SUMMED else torch.float32
    key = (name, dtype, x.device)
    if key not in _buffers:
        if torch.cuda.is_current_stream_capturing():
            return None
        _buffers[key] = _setup(dtype, x.device, group or dist.group.WORLD)
    buffer = _buffers[key]
    if buffer is None or x.numel() * dtype.itemsize > MAX_BYTES:
        return None
    summand = x.to(dtype)
    out = torch.empty_like(summand)
    torch.ops.symm_mem.one_shot_all_reduce_copy_out(buffer[:x.numel()].view(x.shape), summand, "sum", name, out)
    return out.to(x.dtype)


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
        probe = torch.ones(8, dtype=dtype, device=device)         # fails alike on every rank, before any wait
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(buffer[:8], probe, "sum", group.group_name,
                                                         torch.empty_like(probe))
    except Exception as e:                    # noqa: BLE001  (any failure: NCCL instead, on every rank)
        print(f"rayspeed: symmetric-memory all-reduce unavailable, using NCCL: {e}", flush=True)
        buffer = None
    ok = torch.tensor([buffer is not None], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    return buffer if ok.item() else None
