"""One launch each of cuBLAS, the plain Triton GEMM and the stream-K GEMM on GPT-Neo's QKV product at
512 rows, for a profiler: `ncu --kernel-name regex:'gemm|streamk|sm90' python3 bench/streamk_ncu.py`."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.gemm_sweep import triton_gemm  # noqa: E402
from bench.streamk_gemm import GemmConfig, streamk_linear  # noqa: E402

m, n, k = int(os.environ.get("M", "512")), 7680, 2560
x = torch.randn(m, k, device="cuda", dtype=torch.half)
w = torch.randn(n, k, device="cuda", dtype=torch.half) / k**0.5
zeros = torch.zeros(n, device="cuda", dtype=torch.half)
for _ in range(2):                               # compile, then the launch the profiler keeps
    torch.nn.functional.linear(x, w)
    triton_gemm(x, w, zeros, 128, 256, 64, 8, 4)
    streamk_linear(x, w, config=GemmConfig(128, 256, 64, 8, 4))
torch.cuda.synchronize()
