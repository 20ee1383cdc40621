"""When the decode chain's kernels launch with programmatic dependent launch (kernels/pdl.py): by
default on CUDA tensors of a Hopper-or-later GPU with a Triton that has grid dependency control;
never with RAYSPEED_PDL=0. What the kernels do with it is checked on their sm_90 builds (test_sm90_builds)."""
from types import SimpleNamespace

import torch

from kernels import pdl


def fake_cuda_tensor(index: int = 0):
    return SimpleNamespace(is_cuda=True, device=torch.device("cuda", index))


def test_on_hopper_unless_turned_off(monkeypatch):
    monkeypatch.setattr(pdl, "hopper_or_later", lambda index: index == 0)
    monkeypatch.delenv("RAYSPEED_PDL", raising=False)
    assert pdl.enabled(fake_cuda_tensor()) == pdl.AVAILABLE
    monkeypatch.setenv("RAYSPEED_PDL", "0")
    assert not pdl.enabled(fake_cuda_tensor())
    monkeypatch.setenv("RAYSPEED_PDL", "1")
    assert pdl.enabled(fake_cuda_tensor()) == pdl.AVAILABLE
    assert not pdl.enabled(fake_cuda_tensor(1))                     # an older GPU
    assert not pdl.enabled(torch.zeros(1))                          # CPU
    monkeypatch.setattr(pdl, "AVAILABLE", False)
    assert not pdl.enabled(fake_cuda_tensor())
