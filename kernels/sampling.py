"""Seeded exponential noise for sampled draws, computed where the logits are.

A draw races exponential noise: argmax(p / E) over a row picks token i with probability p_i when the
E are independent Exp(1). Unseeded rows take torch's generator (`exponential_`). A seeded request's
row instead takes noise that is a pure function of a 32-bit key and the column: the host derives the
key from the request's seed and the index of the token being drawn (`draw_key`), and every E of the
row is -log(u) with u from an integer hash of (key, column). So a seeded draw needs no generator
state, no host round trip and no copy of the row to the host; it is the same whatever the batch,
the step it runs in (run-ahead included) or the rank (tensor parallelism), and the same on CPU
(torch, below) and CUDA (Triton), up to the last bit of the logarithm.

The hash keeps every intermediate below 2**63, so torch's int64 arithmetic computes it exactly."""
import torch
import triton
import triton.language as tl

from kernels.dispatch import use_triton

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_COLUMN = 0x9E3779B1                     # column spreader; columns < 2**31, so the product fits int64
_ROUNDS = (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39)       # odd multipliers below 2**31


def draw_key(seed: int, index: int) -> int:
    """The 32-bit key of the `index`-th token drawn for a request with `seed` (any Python int): the
    splitmix64 finalizer over seed + (index + 1) * 2**64 / golden ratio, its high 32 bits."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 32


def seeded_exponential_torch(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: fp32 Exp(1) noise [rows, n] from int64 keys [rows] (each below 2**32)."""
    x = keys.to(torch.int64)[:, None] ^ ((torch.arange(n, device=keys.device) * _COLUMN) & _MASK32)
    for shift, mult in zip((16, 15, 16), _ROUNDS):
        x = ((x ^ (x >> shift)) * mult) & _MASK32
    x = x ^ (x >> 15)
    u = ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))          # in (0, 1), never 0 or 1
    return -torch.log(u)


@triton.jit(do_not_specialize=["n", "row_stride"])
def _seeded_exponential_kernel(keys_ptr, out_ptr, n, row_stride, BLOCK: tl.constexpr):
    """Columns [program_id(1) * BLOCK, + BLOCK) of row program_id(0): the reference's hash and -log(u).
    One build for every width (the candidates of a top-k of 50, 64 or the vocabulary): a width
    Triton would specialise on compiled anew on the request that first brought it."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(keys_ptr + row)
    x = key ^ ((cols * 0x9E3779B1) & 0xFFFFFFFF)
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x297A2D39) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    u = ((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    tl.store(out_ptr + row * row_stride + cols, -tl.log(u), mask=cols < n)


def seeded_exponential(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Exp(1) noise [rows, n] in fp32 on keys' device, each row a function of its key (int64 [rows],
    each key in [0, 2**32)) alone: Triton on CUDA, the torch reference elsewhere."""
    assert keys.dim() == 1 and keys.dtype == torch.int64, \
        f"keys must be int64 [rows], got {keys.dtype} {tuple(keys.shape)}"
    if not use_triton(keys) or keys.numel() == 0 or n == 0:
        return seeded_exponential_torch(keys, n)
    out = torch.empty(keys.shape[0], n, dtype=torch.float32, device=keys.device)
    block = 1024
    _seeded_exponential_kernel[(keys.shape[0], triton.cdiv(n, block))](keys, out, n, out.stride(0), BLOCK=block)
    return out
