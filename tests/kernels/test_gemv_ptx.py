"""The weight-streaming kernels compiled for Hopper (sm_90) on this CPU machine, with the pointer and
size alignment a real launch specializes on: they compile, and the CUDA-core kernel's K loop never
round-trips a tensor through shared memory (a layout conversion: `bar.sync` in the loop), which is
what held int8 and int4 back when x and the weights had different per-thread vector widths.

The suite runs Triton's interpreter (tests/conftest.py), so the compiling happens in one child
process without it."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its CUDA backend")

FMA_CASES = [                                       # bits, weight, x, block_n, block_k, sub, prefetch
    (16, "fp16", "fp16", 2, 1024, 1024, False),
    (16, "bf16", "bf16", 4, 1024, 1024, True),
    (8, "i8", "fp16", 4, 1024, 1024, False),         # one scale per row
    (8, "i8", "fp16", 4, 1024, 128, True),           # K-groups of 128
    (4, "u8", "fp16", 8, 1024, 128, False),
    (4, "u8", "bf16", 8, 1024, 128, True),
]

CHILD = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.gemv import _dequantize_kernel, _fma_kernel, _skinny_kernel

def compile_for_sm90(fn, types, constexprs, aligned):
    signature = {**types, **{name: "constexpr" for name in constexprs}}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32)).asm["ptx"]

def inner_loop(ptx):
    start = ptx.index("Inner Loop Header")
    return ptx[start:ptx.index("bra", start)]

out = {"fma": [], "dequantize": {}, "tensor_cores": {}}
sizes = ["M", "N", "K", "stride_xm", "stride_wn", "stride_sn", "stride_rm", "stride_om", "stride_os", "group_size",
         "k_per_split"]
for bits, weight, x, block_n, block_k, sub, prefetch in json.loads(sys.argv[1]):
    pointers = {name: "*" + x for name in ("x_ptr", "s_ptr", "b_ptr", "r_ptr", "out_ptr")}
    types = {**pointers, "w_ptr": "*" + weight, **{name: "i32" for name in sizes}}
    types = {name: types[name] for name in _fma_kernel.arg_names if name in types}
    ptx = compile_for_sm90(_fma_kernel, types, dict(
        BITS=bits, EPILOGUE=True, HAS_BIAS=True, ACT=1, HAS_RESIDUAL=True,
        PER_ROW_SCALE=bits == 8 and sub == block_k, BLOCK_N=block_n, BLOCK_K=block_k, SUB=sub, PREFETCH=prefetch),
        [*pointers, "w_ptr", *sizes[1:]])
    out["fma"].append(inner_loop(ptx))
for bits, weight in ((8, "i8"), (4, "u8")):
    types = {"w_ptr": "*" + weight, "s_ptr": "*fp16", "out_ptr": "*fp16", "N": "i32", "K": "i32", "stride_wn": "i32",
             "stride_sn": "i32", "group_size": "i32"}
    out["dequantize"][bits] = compile_for_sm90(_dequantize_kernel, types, dict(BITS=bits, BLOCK_N=8, BLOCK_K=512, SUB=128),
                                               ["w_ptr", "s_ptr", "out_ptr", "N", "K", "stride_wn", "group_size"])
for bits, weight, block_n, block_k in ((8, "i8", 32, 256), (4, "u8", 64, 128)):
    pointers = {name: "*fp16" for name in ("x_ptr", "s_ptr", "b_ptr", "r_ptr", "out_ptr")}
    types = {**pointers, "w_ptr": "*" + weight, **{name: "i32" for name in sizes}}
    types = {name: types[name] for name in _skinny_kernel.arg_names if name in types}
    ptx = compile_for_sm90(_skinny_kernel, types, dict(
        BITS=bits, EPILOGUE=True, HAS_BIAS=False, ACT=0, HAS_RESIDUAL=False, PER_ROW_SCALE=False, SCALE_IN_TILE=False,
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k), [*pointers, "w_ptr", *sizes[1:]])
    out["tensor_cores"][bits] = inner_loop(ptx)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(FMA_CASES)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", range(len(FMA_CASES)), ids=[
    f"int{c[0]}-{c[1]}-x{c[2]}-{c[3]}x{c[4]}-sub{c[5]}{'-prefetch' if c[6] else ''}" for c in FMA_CASES])
def test_cuda_core_loop_stays_in_registers(compiled, case):
    loop = compiled["fma"][case]
    assert "bar.sync" not in loop and "ld.shared" not in loop
    assert ".v4" in loop                               # x (at least) arrives in 16-byte loads


@pytest.mark.parametrize("bits", ["8", "4"])
def test_tensor_core_tiles_build_halves_without_conversions(compiled, bits):
    """int8/int4 -> fp16 for the MMA by the mantissa trick: no integer-to-float conversion (I2F, a
    quarter-rate instruction) left in the loop."""
    loop = compiled["tensor_cores"][bits]
    assert "mma" in loop and "cvt.rn.f16.s" not in loop and "cvt.rn.f32.s" not in loop


@pytest.mark.parametrize("bits", ["8", "4"])
def test_dequantize_kernel_writes_16_byte_vectors(compiled, bits):
    assert "st.global.v4" in compiled["dequantize"][bits]
