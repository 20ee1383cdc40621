"""What the Triton kernels compile to on Hopper, without a GPU: each kernel built for sm_90 (ptxas
ships with Triton) as a launch with 16-byte aligned pointers and sizes would specialize it, then its
registers, spills and shared memory (cuobjdump) and its main loop (nvdisasm): instructions, barriers
(a layout conversion through shared memory) and instructions per byte of weights for the gemv
kernels. A check between GPU runs; timings still need the GPU (bench/gemv_sweep.py).

    python3 bench/kernel_report.py            # needs TRITON_INTERPRET unset
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.attention import _paged_decode_kernel  # noqa: E402
from kernels.prefill_attention import _prefill_kernel  # noqa: E402
from kernels.dequant import _dequantize_kernel  # noqa: E402
from kernels.gemv import _skinny_kernel  # noqa: E402
from kernels.gemv_fma import _fma_kernel  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
UNALIGNED = {"M", "stride_sn", "stride_rm", "num_heads", "group", "window", "k_new_stride", "v_new_stride"}


def compile_for_sm90(fn, constexprs: dict, pointers: dict, floats=("scale", "eps"), num_warps: int = 4):
    """`fn` for an H100: pointer arguments typed by `pointers` (name -> "*fp16", ...), `floats` fp32,
    other runtime arguments i32, all aligned to 16 but those in UNALIGNED."""
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default and p.name not in constexprs}
    constexprs = {**defaults, **constexprs}          # as a launch that leaves them out would have them
    signature, aligned = {}, []
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            aligned.append(name)
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name not in UNALIGNED:
                aligned.append(name)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def inner_loop_ptx(ptx: str) -> str:
    """The PTX of the first innermost loop (LLVM marks its header)."""
    start = ptx.index("Inner Loop Header")
    return ptx[start:ptx.index("bra", start)]


def resources(kernel) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(TOOLS, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|LOCAL):(\d+)", usage))
    return {"registers": int(fields["REG"]), "spill_bytes": int(fields["LOCAL"]), "shared": kernel.metadata.shared,
            **loop_stats(sass)}


def loop_stats(sass: str) -> dict:
    """Instructions of the longest backward-branch span in the SASS (the main loop)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    span = None
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            if span is None or i - labels[m.group(1)] > span[1] - span[0]:
                span = (labels[m.group(1)], i)
    if span is None:
        return {"loop_instructions": 0, "loop_barriers": 0}
    ops = collections.Counter(m.group(2).split(".")[0] for line in lines[span[0]:span[1] + 1]
                              if (m := re.search(r"\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)))
    return {"loop_instructions": sum(ops.values()), "loop_barriers": ops["BAR"], "top": ops.most_common(5)}


def gemv_cases():
    """(name, kernel, constexprs, pointers, weight bytes per loop iteration per thread)."""
    epilogue = dict(EPILOGUE=True, HAS_BIAS=True, ACT=1, HAS_RESIDUAL=True)
    for bits, weight, block_n, block_k, sub, half in ((16, "*fp16", 2, 1024, 1024, False),
                                                      (8, "*i8", 4, 1024, 1024, False), (4, "*u8", 8, 1024, 128, False),
                                                      (4, "*u8", 16, 512, 128, True), (8, "*i8", 16, 256, 256, True),
                                                      (8, "*i8", 4, 1024, 1024, "x_per_row")):
        pointers = {"x_ptr": "*fp16", "w_ptr": weight, "s_ptr": "*fp16", "b_ptr": "*fp16", "r_ptr": "*fp16",
                    "out_ptr": "*fp16"}
        consts = dict(BITS=bits, **epilogue, PER_ROW_SCALE=bits == 8, BLOCK_N=block_n, BLOCK_K=block_k, SUB=sub,
                      PREFETCH=False, PDL=False, HALF=half is True, ASM=half is True, X_PER_ROW=half == "x_per_row",
                      L2_LANES=0, L2_CHUNK=2048)
        label = {True: " half", False: "", "x_per_row": " x-per-row"}[half]
        yield (f"fma int{bits}{label} {block_n}x{block_k}", _fma_kernel, consts, pointers,
               block_n * block_k * bits // 8 / 128)
    for bits, weight, block_n, block_k in ((16, "*fp16", 32, 256), (8, "*i8", 32, 256), (4, "*u8", 64, 128)):
        pointers = {"x_ptr": "*fp16", "w_ptr": weight, "s_ptr": "*fp16", "b_ptr": "*fp16", "r_ptr": "*fp16",
                    "out_ptr": "*fp16"}
        consts = dict(BITS=bits, **epilogue, PER_ROW_SCALE=False, SCALE_IN_TILE=False, BLOCK_M=16, BLOCK_N=block_n,
                      BLOCK_K=block_k)
        yield (f"tensor-core int{bits} 16x{block_n}x{block_k}", _skinny_kernel, consts, pointers,
               block_n * block_k * bits // 8 / 128)
    for bits, weight in ((8, "*i8"), (4, "*u8")):
        yield (f"dequantize int{bits} 8x512", _dequantize_kernel, dict(BITS=bits, BLOCK_N=8, BLOCK_K=512, SUB=128),
               {"w_ptr": weight, "s_ptr": "*fp16", "out_ptr": "*fp16"}, None)


def attention_cases():
    pointers = {name: "*fp16" for name in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr", "k_new_ptr", "v_new_ptr")}
    pointers.update({"block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "slots_ptr": "*i32", "alibi_ptr": "*fp32",
                     "ws_ptr": "*fp32", "counters_ptr": "*i32"})
    for chunk, prefetch in ((16, False), (32, False), (64, False), (64, True)):
        yield (f"paged decode chunk {chunk}{' prefetch' if prefetch else ''} head_dim<=128", _paged_decode_kernel,
               dict(USE_WINDOW=False, HAS_ALIBI=False, NEW_KV=True, BLOCK_SIZE=16, CHUNK=chunk, BLOCK_D=128,
                    PREFETCH=prefetch, PDL=False, SPLITS=1, SPLIT_MIN_CHUNKS=4), pointers, None)


def prefill_cases():
    pointers = {name: "*fp16" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "k_cache_ptr", "v_cache_ptr")}
    pointers.update({"cu_seqlens_ptr": "*i32", "slots_ptr": "*i32", "alibi_ptr": "*fp32"})
    for block_m, block_d in ((64, 128), (128, 128), (64, 64)):
        yield (f"prefill {block_m} x head_dim<={block_d}", _prefill_kernel,
               dict(USE_WINDOW=False, HAS_ALIBI=False, IEEE=False, STORE_KV=True, CACHE_BLOCK=16, BLOCK_M=block_m,
                    BLOCK_N=block_m, BLOCK_D=block_d, PDL=False), pointers, None)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    print(f"{'kernel':42} {'regs':>5} {'spill':>6} {'smem':>6} {'loop':>6} {'bar':>4} {'per byte':>9}  top loop ops")
    for name, fn, consts, pointers, bytes_per_thread in [*gemv_cases(), *attention_cases(), *prefill_cases()]:
        r = resources(compile_for_sm90(fn, consts, pointers))
        per_byte = f"{r['loop_instructions'] / bytes_per_thread:.1f}" if bytes_per_thread else ""
        print(f"{name:42} {r['registers']:5} {r['spill_bytes']:6} {r['shared']:6} {r['loop_instructions']:6} "
              f"{r['loop_barriers']:4} {per_byte:>9}  {r.get('top', '')}")


if __name__ == "__main__":
    main()
