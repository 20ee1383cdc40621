"""Programmatic dependent launch (Hopper and later), on by default there; RAYSPEED_PDL=0 turns it off.

A decode step is a chain of short kernels (norm, matmul, attention, matmul, norm, ...) each waiting
for the one before. Launched with `launch_pdl=True`, a kernel of the chain may be scheduled while the
previous one drains: it runs what does not depend on that kernel (index math; the CUDA-core matmul
also its first weight tile, which never changes), then `await_previous` (griddepcontrol.wait, which
returns once every earlier kernel has finished and its writes are visible) before reading
activations or writing anything. A kernel not launched this way is waited for as usual, so the
chain may hold other kernels (cuBLAS, torch ops). CUDA graphs keep the programmatic edges.

Measured on an H100 (GPT-Neo 2.7B, bench/results/*-neo-pdl{0,1}.json): batch-1 decode steps 3-6 %
faster (fp16 2.75 -> 2.67 ms, int8 2.10 -> 1.98, int4 2.40 -> 2.28); the tensor-core gemv tiles
launched this way made int8 at batch 32 8 % slower, so they launch normally (kernels/gemv.py).
"""
import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def await_previous(PDL: tl.constexpr):
        """With PDL: wait for the previous kernels, then let the next kernel of the chain be scheduled
        (it launches once every program of this one got here or finished)."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    AVAILABLE = True
except ImportError:                                     # a Triton without grid dependency control
    @triton.jit
    def await_previous(PDL: tl.constexpr):
        pass

    AVAILABLE = False


@triton.jit
def prefetch_rows_l2(ptrs, nbytes):
    """Ask the L2 for `nbytes` (a multiple of 16; a constant or a run-time value) at each of the
    16-byte aligned byte pointers `ptrs` (e.g. the start of a program's slice of each of its weight
    rows): one bulk prefetch each (`cp.async.bulk.prefetch.L2`, Hopper), which returns at once and
    loads nothing into registers."""
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                              [ptrs, tl.zeros(ptrs.shape, tl.int32) + nbytes], dtype=tl.int32, is_pure=False,
                              pack=1)


@triton.jit
def prefetch_l2(base_ptr, start, end, LANES: tl.constexpr, CHUNK: tl.constexpr):
    """Ask the L2 for bytes [start, start + LANES * CHUNK) of the buffer at `base_ptr`, none at or past
    `end` (a multiple of CHUNK, as is start): one `prefetch_rows_l2` of CHUNK bytes per lane. A kernel issues it before
    `await_previous` for data it will read later: the bytes stream in while the previous kernel
    finishes. The caller keeps it out of Triton's interpreter (inline assembly)."""
    offs = start + tl.arange(0, LANES).to(tl.int64) * CHUNK
    offs = tl.minimum(offs, end - CHUNK)                  # lanes past the end repeat the last chunk
    prefetch_rows_l2(base_ptr.to(tl.pointer_type(tl.int8)) + offs, CHUNK)


@functools.cache
def hopper_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(x: torch.Tensor) -> bool:
    """Whether kernels working on `x` launch with programmatic dependent launch."""
    return (AVAILABLE and x.is_cuda and os.environ.get("RAYSPEED_PDL", "1") != "0"
            and hopper_or_later(x.device.index or 0))
