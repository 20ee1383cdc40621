"""Session-wide test set-up. Triton kernels run in the interpreter on machines without CUDA;
the flag must be set before any kernel module is imported (triton reads it at decoration)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(2)

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
