"""Which fresh-prefill graph buckets the start-up capture takes (`PrefillGraphs.buckets_up_to`): every
bucket a step of up to the limit can fall in, and no bucket no step reaches. Pure host logic (the
captures themselves need CUDA: tests/actors/test_cuda_paths.py)."""
import pytest
import torch

from actors.cuda_graphs import PrefillGraphs


@pytest.mark.parametrize("max_seqs, limit", [(64, 1024), (8, 100), (256, 16), (4, 4096), (64, 0)])
def test_start_up_buckets_are_exactly_those_steps_reach(max_seqs, limit):
    graphs = PrefillGraphs(None, max_seqs, pad_slot=0, device=torch.device("cpu"))
    listed = graphs.buckets_up_to(limit)
    reached = {graphs.bucket(tokens, seqs) for tokens in range(1, max(limit, 16) + 1)
               for seqs in range(1, min(tokens, max_seqs) + 1)}
    assert len(listed) == len(set(listed)) and set(listed) == reached - {None}
    assert (16, 2) in listed                       # the smallest, whatever the limit: it compiles the kernels
