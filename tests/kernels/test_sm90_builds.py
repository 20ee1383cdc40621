"""The hot Triton kernels compiled for Hopper (sm_90) on this CPU machine (bench/kernel_report.py),
as a launch with aligned pointers and sizes would specialize them: they compile, and their main
loops keep what made them fast: no round trip through shared memory (`bar.sync`) in the CUDA-core
gemv loop (x and the weights share a register layout) or in the decode attention loop (per-lane
softmax states, merged after it); no integer-to-float conversions where the mantissa trick does;
with programmatic dependent launch, no activation read or write before the wait.

The suite runs Triton's interpreter (tests/conftest.py), so the compiling happens in one child
process without it."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its CUDA backend")

GEMV_POINTERS = {name: "*fp16" for name in ("x_ptr", "s_ptr", "b_ptr", "r_ptr", "out_ptr")}
EPILOGUE = dict(EPILOGUE=True, HAS_BIAS=True, ACT=1, HAS_RESIDUAL=True)
ATTENTION_POINTERS = {**{name: "*fp16" for name in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr", "k_new_ptr",
                                                     "v_new_ptr")},
                      "block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "slots_ptr": "*i32", "alibi_ptr": "*fp32",
                      "ws_ptr": "*fp32", "counters_ptr": "*i32"}


def fma(bits, weight, x, block_n, block_k, sub, prefetch, pdl=False, half=False, num_warps=4, x_per_row=False,
        l2=False):
    pointers = {**{name: f"*{x}" for name in GEMV_POINTERS}, "w_ptr": f"*{weight}"}
    return ("kernels.gemv_fma", "_fma_kernel", dict(BITS=bits, **EPILOGUE, PER_ROW_SCALE=bits == 8 and sub == block_k,
                                                BLOCK_N=block_n, BLOCK_K=block_k, SUB=sub, PREFETCH=prefetch,
                                                PDL=pdl, HALF=half, ASM=half, X_PER_ROW=x_per_row,
                                                L2_LANES=32 * num_warps if l2 else 0, L2_CHUNK=2048), pointers,
            num_warps)


def rows(bits, weight, rows_, block_k, sub, half=False, num_warps=1, prefetch=False, pdl=False, l2=False,
         l2_head=False, norm=0, norm_weight=True):
    pointers = {**GEMV_POINTERS, "w_ptr": f"*{weight}", "g_ptr": "*fp16", "c1_ptr": "*fp32"}
    return ("kernels.gemv_rows", "_rows_kernel", dict(BITS=bits, **EPILOGUE, PER_ROW_SCALE=bits == 8 and sub == block_k,
                                                      ROWS=rows_, BLOCK_K=block_k, SUB=sub, PDL=pdl, HALF=half,
                                                      ASM=half, L2=l2, PREFETCH=prefetch,
                                                      L2_LANES=32 * num_warps if l2_head else 0, L2_CHUNK=2048,
                                                      NORM=norm, NORM_WEIGHT=norm_weight),
            pointers, num_warps)


def tensor_cores(bits, weight, block_n, block_k):
    return ("kernels.gemv", "_skinny_kernel", dict(BITS=bits, **EPILOGUE, PER_ROW_SCALE=False, SCALE_IN_TILE=False,
                                                   BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k),
            {**GEMV_POINTERS, "w_ptr": f"*{weight}"})


def swapped(bits, weight, block_n, block_k, pdl=False, l2_rows=0):
    return ("kernels.gemv", "_swap_kernel", dict(BITS=bits, **EPILOGUE, PER_ROW_SCALE=False, BLOCK_M=32,
                                                 BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl, L2_ROWS=l2_rows),
            {**GEMV_POINTERS, "w_ptr": f"*{weight}"})


def decode_attention(chunk, window, alibi, pdl=False, prefetch=False, splits=1, early=False, num_warps=4,
                     l2_ahead=0, whole=False):
    return ("kernels.attention", "_paged_decode_kernel", dict(USE_WINDOW=window, HAS_ALIBI=alibi, NEW_KV=True,
                                                              BLOCK_SIZE=16, CHUNK=chunk, BLOCK_D=128, PDL=pdl,
                                                              PREFETCH=prefetch, SPLITS=splits, EARLY=early,
                                                              L2_AHEAD=l2_ahead, WHOLE=whole),
            ATTENTION_POINTERS, num_warps)


def prefill_attention(block, window_alibi, pdl=False):
    return ("kernels.prefill_attention", "_prefill_kernel",
            dict(USE_WINDOW=window_alibi, HAS_ALIBI=window_alibi, IEEE=False, STORE_KV=True, CACHE_BLOCK=16,
                 BLOCK_M=block, BLOCK_N=block, BLOCK_D=128, PDL=pdl),
            {**{name: "*fp16" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "k_cache_ptr", "v_cache_ptr")},
             "cu_seqlens_ptr": "*i32", "slots_ptr": "*i64", "alibi_ptr": "*fp32"})


BUILDS = {
    "fma-int16-fp16": fma(16, "fp16", "fp16", 2, 1024, 1024, False),
    "fma-int16-bf16-prefetch": fma(16, "bf16", "bf16", 4, 1024, 1024, True),
    "fma-int8-per-row": fma(8, "i8", "fp16", 4, 1024, 1024, False),
    "fma-int8-groups-prefetch": fma(8, "i8", "fp16", 4, 1024, 128, True),
    "fma-int4": fma(4, "u8", "fp16", 8, 1024, 128, False),
    "fma-int4-bf16-prefetch": fma(4, "u8", "bf16", 8, 1024, 128, True),
    "fma-int4-half": fma(4, "u8", "fp16", 16, 512, 128, False, half=True),
    "fma-int8-half": fma(8, "i8", "fp16", 16, 256, 256, False, half=True),
    "fma-int8-half-groups-prefetch": fma(8, "i8", "fp16", 32, 128, 64, True, half=True),
    "fma-int8-x-per-row": fma(8, "i8", "fp16", 4, 1024, 128, True, x_per_row=True),
    "fma-int4-x-per-row": fma(4, "u8", "fp16", 8, 1024, 128, False, x_per_row=True),
    "fma-int4-half-prefetch-8-warps": fma(4, "u8", "fp16", 8, 1024, 128, True, half=True, num_warps=8),
    "rows-int16-fp16": rows(16, "fp16", 4, 512, 512),
    "rows-int8-per-row-prefetch": rows(8, "i8", 8, 256, 256, prefetch=True),
    "rows-int4": rows(4, "u8", 8, 256, 128),
    "rows-int8-half": rows(8, "i8", 4, 512, 512, half=True),
    "rows-int4-half-prefetch": rows(4, "u8", 8, 1024, 128, half=True, prefetch=True),
    "pdl-rows-int4-half-l2": rows(4, "u8", 4, 1024, 128, half=True, pdl=True, l2=True),
    "pdl-rows-int8-half-l2-head": rows(8, "i8", 4, 512, 512, half=True, pdl=True, l2_head=True),
    "rows-int8-half-layernorm": rows(8, "i8", 4, 512, 512, half=True, pdl=True, norm=1),
    "rows-int8-half-prefetch-layernorm": rows(8, "i8", 8, 512, 512, half=True, prefetch=True, norm=1),
    "rows-int4-half-rmsnorm": rows(4, "u8", 8, 1024, 128, half=True, norm=2),
    "rows-int8-half-layernorm-in-w": rows(8, "i8", 4, 512, 512, half=True, norm=1, norm_weight=False),
    "tensor-cores-int8": tensor_cores(8, "i8", 32, 256),
    "tensor-cores-int4": tensor_cores(4, "u8", 64, 128),
    "swapped-int8": swapped(8, "i8", 64, 128),
    "pdl-swapped-fp16-l2": swapped(16, "fp16", 64, 128, pdl=True, l2_rows=512),
    "decode-chunk64": decode_attention(64, False, False),
    "decode-chunk64-prefetch": decode_attention(64, False, False, prefetch=True),
    "decode-chunk32-window-alibi": decode_attention(32, True, True),
    "decode-split8-prefetch": decode_attention(64, True, False, prefetch=True, splits=8),
    "decode-chunk16-early-2-warps": decode_attention(16, True, False, early=True, num_warps=2),
    "decode-chunk64-early": decode_attention(64, False, False, early=True),
    "pdl-fma-int8-prefetch": fma(8, "i8", "fp16", 4, 1024, 1024, True, pdl=True),
    "pdl-fma-fp16-l2": fma(16, "fp16", "fp16", 2, 1024, 1024, False, pdl=True, l2=True),
    "pdl-decode": decode_attention(64, False, False, pdl=True, prefetch=True),
    "pdl-decode-chunk32-early": decode_attention(32, False, False, pdl=True, early=True),
    "pdl-decode-chunk64-early-l2": decode_attention(64, True, False, pdl=True, early=True, l2_ahead=256),
    "pdl-decode-whole-128": decode_attention(128, True, False, pdl=True, early=True, num_warps=4, whole=True),
    "pdl-decode-whole-256": decode_attention(256, True, False, pdl=True, early=True, num_warps=16, whole=True),
    "pdl-layer-norm": ("kernels.norm", "_layer_norm_kernel", dict(HAS_BIAS=True, HAS_RESIDUAL=True, BLOCK=4096,
                                                                 PDL=True),
                       {name: "*fp16" for name in ("x_ptr", "r_ptr", "sum_ptr", "w_ptr", "b_ptr", "out_ptr")}),
    "pdl-rms-norm": ("kernels.norm", "_rms_norm_kernel", dict(HAS_RESIDUAL=True, BLOCK=4096, PDL=True),
                     {name: "*fp16" for name in ("x_ptr", "r_ptr", "sum_ptr", "w_ptr", "out_ptr")}),
    "pdl-rotary": ("kernels.rotary", "_rotary_kernel", dict(INTERLEAVED=False, BLOCK_R=64, BLOCK_D=1, PDL=True),
                   {"x_ptr": "*fp16", "out_ptr": "*fp16", "pos_ptr": "*i64", "cos_sin_ptr": "*fp32"}),
    "prefill-window-alibi": prefill_attention(64, True),
    "prefill-32-rows": prefill_attention(32, False),
    "prefill-pdl": prefill_attention(64, False, pdl=True),
    "argmax-parts": ("kernels.argmax", "_argmax_parts_kernel", dict(PART=2048, BLOCK=1024),
                     {"x_ptr": "*fp32", "max_ptr": "*fp32", "index_ptr": "*i32"}),
    "embedding": ("kernels.embedding", "_embed_kernel", dict(HAS_POSITIONS=True, BLOCK=4096),
                  {"ids_ptr": "*i64", "positions_ptr": "*i64", "tokens_ptr": "*fp16", "pos_table_ptr": "*fp16",
                   "out_ptr": "*fp16"}),
    "dequantize-int8": ("kernels.dequant", "_dequantize_kernel", dict(BITS=8, BLOCK_N=8, BLOCK_K=512, SUB=128),
                        {"w_ptr": "*i8", "s_ptr": "*fp16", "out_ptr": "*fp16"}),
    "dequantize-int4": ("kernels.dequant", "_dequantize_kernel", dict(BITS=4, BLOCK_N=8, BLOCK_K=512, SUB=128),
                        {"w_ptr": "*u8", "s_ptr": "*fp16", "out_ptr": "*fp16"}),
}

CHILD = r"""
import importlib, json, sys
from bench.kernel_report import compile_for_sm90, inner_loop_ptx
out = {}
for name, (module, kernel, constexprs, pointers, *num_warps) in json.loads(sys.argv[1]).items():
    ptx = compile_for_sm90(getattr(importlib.import_module(module), kernel), constexprs, pointers,
                           num_warps=num_warps[0] if num_warps else 4).asm["ptx"]
    out[name] = {"ptx": ptx, "loop": inner_loop_ptx(ptx) if "Inner Loop Header" in ptx else ""}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def built() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(BUILDS)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", [name for name in BUILDS if name.startswith(("fma", "rows", "decode"))])
def test_loops_stay_in_registers(built, name):
    loop = built[name]["loop"]
    assert loop and "bar.sync" not in loop and "ld.shared" not in loop


@pytest.mark.parametrize("name", [name for name in BUILDS if name.startswith(("fma", "rows")) and "half" not in name])
def test_cuda_core_gemv_loads_16_bytes_of_x_at_a_time(built, name):
    assert ".v4" in built[name]["loop"]


@pytest.mark.parametrize("name", [name for name in BUILDS if "half" in name])
def test_half_tiles_multiply_in_packed_fp16(built, name):
    """int4 and int8 half tiles: 16-byte vectors of weight words, two columns per fp16x2 multiply-add,
    and no integer-to-float conversion (nibbles and bytes go into fp16 mantissas; int8's by PRMT)."""
    loop = built[name]["loop"]
    assert "ld.global.v4.b32" in loop and "fma.rn.f16x2" in loop
    assert "int8" not in name or "prmt.b32" in loop
    assert "cvt.rn.f16.s" not in loop and "cvt.rn.f32.s" not in loop and "cvt.rn.f32.u" not in loop


@pytest.mark.parametrize("name", ["tensor-cores-int8", "tensor-cores-int4", "swapped-int8"])
def test_tensor_core_tiles_build_halves_without_conversions(built, name):
    """int8/int4 -> fp16 for the MMA by the mantissa trick: no integer-to-float conversion (I2F, a
    quarter-rate instruction) left in the loop."""
    loop = built[name]["loop"]
    assert "mma" in loop and "cvt.rn.f16.s" not in loop and "cvt.rn.f32.s" not in loop


@pytest.mark.parametrize("name", [name for name in BUILDS if name.startswith("pdl")])
def test_programmatic_launch_waits_before_reading_activations(built, name):
    """With PDL each kernel of the decode chain waits for the previous kernels (griddepcontrol.wait)
    before its first activation read and then lets the next one launch. What the previous kernels
    leave alone is read before the wait: the CUDA-core matmul's first weight tile (with PREFETCH),
    decode attention's first chunk of cached keys and values (earlier steps wrote them), the norms'
    weights, the matmuls' biases; the rotary kernel reads nothing before it. Nothing is written before it."""
    ptx = built[name]["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    assert wait < ptx.index("griddepcontrol.launch_dependents")
    assert "st.global" not in ptx[:wait]
    assert "ld.global" in ptx[wait:]                          # x / q, after the wait
    if name == "pdl-rotary":
        assert "ld.global" not in ptx[:wait]
    elif "l2" not in name:
        assert ptx.index("ld.global") < wait


def test_l2_prefetch_is_issued_before_the_wait(built):
    """With L2_LANES the CUDA-core matmul asks the L2 for the head of its weight (bulk prefetches, one
    per thread) before waiting for the previous kernel, and the loop stays as it was."""
    ptx = built["pdl-fma-fp16-l2"]["ptx"]
    assert "cp.async.bulk.prefetch.L2.global" in ptx[:ptx.index("griddepcontrol.wait")]
    assert "cp.async.bulk.prefetch" not in built["pdl-fma-fp16-l2"]["loop"]
    assert "cp.async.bulk.prefetch" not in built["fma-int16-fp16"]["ptx"]


def test_rows_tiles_ask_l2_for_their_rows_before_the_wait(built):
    """`rows` tiles with L2 ask the L2 for each of their rows' K slice (a run-time size) before the
    PDL wait, not in the loop, and with L2_LANES for the weight's head as `_fma_kernel` does; without
    either they ask nothing."""
    ptx = built["pdl-rows-int4-half-l2"]["ptx"]
    assert "cp.async.bulk.prefetch.L2.global" in ptx[:ptx.index("griddepcontrol.wait")]
    assert "cp.async.bulk.prefetch" not in built["pdl-rows-int4-half-l2"]["loop"]
    assert "cp.async.bulk.prefetch" not in built["rows-int4-half-prefetch"]["ptx"]
    head = built["pdl-rows-int8-half-l2-head"]
    assert "cp.async.bulk.prefetch.L2.global" in head["ptx"][:head["ptx"].index("griddepcontrol.wait")]
    assert "cp.async.bulk.prefetch" not in head["loop"]


def test_swapped_tiles_use_hopper_mma_and_ask_l2_for_their_rows_first(built):
    """The swapped-operand gemv puts 64 weight rows on wgmma's long side (x's 32 rows on its short
    one) and, with L2_ROWS, asks the L2 for each row's slice before the PDL wait."""
    ptx = built["pdl-swapped-fp16-l2"]["ptx"]
    assert "wgmma.mma_async" in ptx and "m64n32k16" in ptx
    assert "cp.async.bulk.prefetch.L2.global" in ptx[:ptx.index("griddepcontrol.wait")]
    assert "cp.async.bulk.prefetch" not in built["swapped-int8"]["ptx"]


def test_decode_asks_l2_for_later_chunks_before_the_wait(built):
    """Decode attention with L2_AHEAD asks the L2 for the later chunks' key and value rows (two bulk
    prefetches a position lane) before the PDL wait, and nothing in the loop."""
    ptx = built["pdl-decode-chunk64-early-l2"]["ptx"]
    assert ptx[:ptx.index("griddepcontrol.wait")].count("cp.async.bulk.prefetch.L2.global") >= 2
    assert "cp.async.bulk.prefetch" not in built["pdl-decode-chunk64-early-l2"]["loop"]
    assert "cp.async.bulk.prefetch" not in built["pdl-decode-chunk32-early"]["ptx"]


def test_whole_context_decode_reads_the_cache_only_before_the_wait(built):
    """With WHOLE, every cached key and value is read before the PDL wait (16-byte vectors); after it
    only the query (one vector a thread), this step's key and value and its slot; there is no loop."""
    for name in ("pdl-decode-whole-128", "pdl-decode-whole-256"):
        ptx = built[name]["ptx"]
        wait = ptx.index("griddepcontrol.wait")
        assert not built[name]["loop"]
        assert ptx[:wait].count("ld.global.v4") >= 8 and ptx[wait:].count("ld.global.v4") <= 1, name


def test_split_decode_merges_after_a_released_ticket(built):
    """Split-context decode: every thread's partial-state stores, then a barrier, then one acq_rel
    ticket at GPU scope; the merging program reads the states through L2 (ld.global.cg)."""
    ptx = built["decode-split8-prefetch"]["ptx"]
    ticket = ptx.index("atom.global.gpu.acq_rel.add")
    assert "st.global" in ptx[:ticket] and "bar.sync" in ptx[ptx.rindex("st.global", 0, ticket):ticket]
    assert "ld.global.cg" in ptx[ticket:]
    assert "atom." not in built["decode-chunk64-prefetch"]["ptx"]


def test_prefill_attention_builds_with_every_option(built):
    """The three kinds of key-block step (window edge, wholly visible, diagonal) compile, on the tensor
    cores; so do 32-row blocks (heads wider than 128, or RAYSPEED_PREFILL_CONFIG)."""
    assert "mma" in built["prefill-window-alibi"]["ptx"]
    assert "mma" in built["prefill-32-rows"]["ptx"]


def test_prefill_waits_for_the_qkv_product_before_reading_it(built):
    """With PDL the prefill kernel reads only cu_seqlens before its wait: no q, k or v."""
    ptx = built["prefill-pdl"]["ptx"]
    assert ptx[:ptx.index("griddepcontrol.wait")].count("ld.global") <= 2
    assert "griddepcontrol" not in built["prefill-window-alibi"]["ptx"]


def test_split_argmax_reads_16_byte_vectors(built):
    """The greedy argmax's first pass reads each part of a row in 16-byte vectors."""
    assert "ld.global.v4" in built["argmax-parts"]["ptx"]


@pytest.mark.parametrize("name", ["dequantize-int8", "dequantize-int4"])
def test_dequantize_kernel_writes_16_byte_vectors(built, name):
    assert "st.global.v4" in built[name]["ptx"]


@pytest.mark.parametrize("name", [name for name in BUILDS if name.startswith("rows") and name.endswith("norm")])
def test_rows_tiles_do_the_norm_in_the_loop(built, name):
    """With the norm before the product inside: x times the norm weight in packed fp16 and the sum of
    squares in fp32 multiply-adds, inside the loop that streams the weight."""
    loop = built[name]["loop"]
    assert "mul.rn.f16x2" in loop and "fma.rn.f32" in loop and "ld.global.v4.b32" in loop
