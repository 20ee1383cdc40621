"""What one kernel boundary costs in a decode step's chain: N dependent one-load kernels back to back
in a CUDA graph (each reads what the one before wrote), with and without programmatic dependent launch
(kernels/pdl.py), by grid size; µs per kernel. A decode step of GPT-Neo 2.7B has five such boundaries
a layer, so this is the floor each adds whatever the kernel does.

    python3 bench/pdl_chain.py [--kernels 400] [--grids 20,132,640]
"""
import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.pdl import await_previous  # noqa: E402


@triton.jit
def _hop_kernel(x_ptr, out_ptr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    await_previous(PDL)
    tl.store(out_ptr + pid, tl.load(x_ptr + pid) + 1.0)


def per_kernel_us(grid: int, kernels: int, pdl: bool, warps: int) -> float:
    a, b = torch.zeros(grid, device="cuda"), torch.zeros(grid, device="cuda")

    def chain():
        for i in range(kernels):
            src, dst = (a, b) if i % 2 == 0 else (b, a)
            _hop_kernel[(grid,)](src, dst, PDL=pdl, num_warps=warps, launch_pdl=pdl)

    chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    assert a[0].item() > 0
    return start.elapsed_time(end) * 1e3 / (20 * kernels)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", type=int, default=400)
    ap.add_argument("--grids", default="20,132,640")
    ap.add_argument("--warps", type=int, default=4)
    args = ap.parse_args()
    rows = {}
    for grid in (int(g) for g in args.grids.split(",")):
        rows[grid] = {pdl: round(per_kernel_us(grid, args.kernels, pdl, args.warps), 3) for pdl in (False, True)}
        print(f"grid {grid}: µs per dependent kernel without PDL {rows[grid][False]}, with {rows[grid][True]}",
              flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "us_per_kernel": rows}))


if __name__ == "__main__":
    main()
