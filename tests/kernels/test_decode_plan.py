"""kernels/decode_plan.py: how decode attention runs a step, by grid size, host-known context bound,
head size and weight format (no kernel runs here: the rules are pure functions of the GPU's SM count)."""
import os

import pytest
import torch

from kernels import decode_plan as plans


def test_decode_chunk_by_grid_size(monkeypatch):
    """64 positions a step, the first read early, while 3 programs per SM hold the grid (with l2_ahead
    and at most one program per SM, the rest asked of the L2 too); else 16 in programs of 2 warps, as
    for steps of at most FEW_PAIRS (head, sequence) pairs, whatever their splits, whose contexts the host
    bounds within SMALL_CHUNK_CONTEXTS; for heads of up to 128, those bounded within (64, 128] one chunk
    of them all in 4 warps (and, by default, up to 256 in 16 warps with l2_ahead; RAYSPEED_WHOLE_CONTEXT=128
    stops at 128); RAYSPEED_DECODE_CONFIG overrides."""
    assert plans.WHOLE_UP_TO == 256 or "RAYSPEED_WHOLE_CONTEXT" in os.environ       # the default
    monkeypatch.setattr(plans, "sm_count", lambda index: 132)
    monkeypatch.setattr(plans, "WHOLE_UP_TO", 128)
    cuda = torch.device("cuda", 0)
    assert plans.decode_chunk(20 * 8, cuda) == (64, "early", 4)
    assert plans.decode_chunk(20, cuda, l2_ahead=True) == (64, "early-l2", 4)
    assert plans.decode_chunk(132, cuda, l2_ahead=True) == (64, "early-l2", 4)
    assert plans.decode_chunk(133, cuda, l2_ahead=True) == (64, "early", 4)
    assert plans.decode_chunk(20 * 8, cuda, l2_ahead=True) == (64, "early", 4)
    assert plans.decode_chunk(20 * 32, cuda, l2_ahead=True) == (16, "early", 2)
    assert plans.decode_chunk(20, torch.device("cpu"), l2_ahead=True) == (64, "early", 4)
    assert plans.decode_chunk(20 * 16, cuda) == (64, "early", 4)
    assert plans.decode_chunk(20 * 32, cuda) == (16, "early", 2)
    assert plans.decode_chunk(20 * 32, torch.device("cpu")) == (64, "early", 4)
    assert plans.decode_chunk(20 * 8, cuda, True, pairs=20, max_context=256) == (16, "early", 2)   # batch 1
    assert plans.decode_chunk(32, cuda, True, pairs=32, max_context=129) == (16, "early", 2)
    monkeypatch.setattr(plans, "WHOLE_UP_TO", 256)              # the default
    assert plans.decode_chunk(32, cuda, True, pairs=32, max_context=129) == (256, "early-l2", 16)
    assert plans.decode_chunk(32, cuda, False, pairs=32, max_context=129) == (16, "early", 2)      # int4
    monkeypatch.setattr(plans, "WHOLE_UP_TO", 0)
    assert plans.decode_chunk(20, cuda, True, pairs=20, max_context=128) == (64, "early-l2", 4)
    monkeypatch.setattr(plans, "WHOLE_UP_TO", 128)
    assert plans.decode_chunk(32, cuda, True, pairs=32, max_context=256, head_dim=256) == (16, "early", 2)
    assert plans.decode_chunk(20, cuda, True, pairs=20, max_context=128) == (128, "early-l2", 4)
    assert plans.decode_chunk(20, cuda, False, pairs=20, max_context=80) == (128, "early", 4)
    assert plans.decode_chunk(20, cuda, True, pairs=20, max_context=128, head_dim=256) == (64, "early-l2", 4)
    assert plans.decode_chunk(20, cuda, True, pairs=20, max_context=64) == (64, "early-l2", 4)
    assert plans.decode_chunk(20 * 4, cuda, True, pairs=80, max_context=128) == (64, "early-l2", 4)
    assert plans.decode_chunk(20 * 8, cuda, True, pairs=20, max_context=257) == (64, "early", 4)
    assert plans.decode_chunk(20 * 8, cuda, True, pairs=20) == (64, "early", 4)             # unbounded
    assert plans.decode_chunk(40 * 4, cuda, True, pairs=40, max_context=256) == (64, "early", 4)
    assert plans.decode_chunk(20, torch.device("cpu"), pairs=20, max_context=256) == (64, "early", 4)
    monkeypatch.setenv("RAYSPEED_DECODE_CONFIG", "16,prefetch,8")
    assert plans.decode_chunk(20, cuda) == (16, "prefetch", 8)
    monkeypatch.setenv("RAYSPEED_DECODE_CONFIG", "16,ahead,8")
    with pytest.raises(AssertionError, match="mode must be one of"):
        plans.decode_chunk(20, cuda)


def test_decode_plan_by_step(monkeypatch):
    """GPT-Neo 2.7B's batch-1 steps (20 heads of 128, cache blocks of 16) as the decode graphs bound them:
    unbounded, 8 splits of 64-position chunks; within (64, 128], the whole context read by one program;
    within (128, 256], with l2_ahead, one program reading it whole in 16 warps, not 8 splits of
    256-position loops (the split choice asked without l2_ahead); without l2_ahead (int4) or with
    RAYSPEED_WHOLE_CONTEXT=128, 8 splits of 16. Without split tickets: one program, same chunk rule."""
    monkeypatch.setattr(plans, "sm_count", lambda index: 132)
    monkeypatch.setattr(plans, "WHOLE_UP_TO", 128)
    cuda, plan = torch.device("cuda", 0), plans.decode_plan
    assert plan(20, cuda, True, None, 128, 16) == (8, 64, "early", 4, False)
    assert plan(20, cuda, True, 256, 128, 16) == (8, 16, "early", 2, False)
    assert plan(20, cuda, True, 128, 128, 16) == (1, 128, "early-l2", 4, True)
    assert plan(20, cuda, False, 128, 128, 16) == (1, 128, "early", 4, True)
    assert plan(20, cuda, True, 64, 128, 16) == (1, 64, "early-l2", 4, True)
    assert plan(20, cuda, True, 256, 128, 16, can_split=False) == (1, 16, "early", 2, False)
    assert plan(20 * 8, cuda, True, 256, 128, 16) == (1, 64, "early", 4, False)            # batch 8
    assert plan(20, torch.device("cpu"), True, 256, 128, 16) == (1, 64, "early", 4, False)
    monkeypatch.setattr(plans, "WHOLE_UP_TO", 256)
    assert plan(20, cuda, True, 256, 128, 16) == (1, 256, "early-l2", 16, True)
    assert plan(20, cuda, False, 256, 128, 16) == (8, 16, "early", 2, False)                 # int4


def test_decode_splits_fill_two_programs_per_sm(monkeypatch):
    monkeypatch.setattr(plans, "sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert plans.decode_splits(20, cuda) == 8            # GPT-Neo 2.7B at batch 1: 160 programs
    assert plans.decode_splits(32, cuda) == 8            # Llama-2-7B: 256
    assert plans.decode_splits(80, cuda) == 2
    assert plans.decode_splits(160, cuda) == 1
    assert plans.decode_splits(1, cuda) == plans.MAX_SPLITS
    assert plans.decode_splits(20, torch.device("cpu")) == 1
    monkeypatch.setenv("RAYSPEED_DECODE_SPLITS", "1")
    assert plans.decode_splits(20, cuda) == 1
    monkeypatch.setenv("RAYSPEED_DECODE_SPLITS", "3")
    with pytest.raises(AssertionError, match="power of two"):
        plans.decode_splits(20, cuda)
