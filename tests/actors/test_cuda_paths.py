"""The CUDA-only paths of the engine, on a GPU (`pytest -m gpu`; skipped without one): decode and
fresh-prefill CUDA graphs, the varlen prefill kernel and run-ahead give the tokens of the eager,
lockstep engine, for families with a local window (GPT-Neo), grouped-query attention (Llama) and
ALiBi (BLOOM); prompts of mixed lengths, so the prefill graphs pad."""
import pytest
import torch

import rayspeed
from actors.sequence import SamplingParams, Sequence
from tests.helpers import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [list(range(40, 41)), list(range(7, 12)), list(range(60, 77)), list(range(3, 43))]


def generate(hf, **config) -> tuple[list[list[int]], object]:
    engine = rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=True, device="cuda",
                                     max_num_seqs=8, **config)
    out = engine.generate(PROMPTS, max_new_tokens=20, ignore_eos=True)
    return [o.outputs[0].token_ids for o in out], engine.backend


@pytest.mark.parametrize("family", ["gpt_neo", "llama", "bloom"])
def test_graphs_and_run_ahead_give_the_eager_lockstep_tokens(family):
    hf = tiny_model(family)
    expected, _ = generate(hf, enable_cuda_graph=False, run_ahead=False)
    got, engine = generate(hf)
    assert engine.runner.graphs is not None and engine.runner.prefill_graphs is not None and engine.run_ahead
    assert len(engine.runner.prefill_graphs.graphs) > 1                 # a bucket beyond the warm-up one ran
    assert got == expected
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


@pytest.mark.parametrize("family", ["gpt_neo", "llama"])
@pytest.mark.parametrize("dtype", [torch.float16, "int8"])
def test_programmatic_dependent_launch_gives_the_same_tokens(family, dtype, monkeypatch):
    """Programmatic dependent launch (kernels/pdl.py, on by default on Hopper): the decode chain's kernels
    overlap their launches and wait on the GPU instead; greedy tokens with graphs and run-ahead equal
    those of a run with RAYSPEED_PDL=0."""
    hf = tiny_model(family)

    def tokens():
        engine = rayspeed.init_inference(hf, dtype=dtype, replace_with_kernel_inject=True, device="cuda",
                                         max_num_seqs=8)
        return [o.outputs[0].token_ids for o in engine.generate(PROMPTS, max_new_tokens=20, ignore_eos=True)]

    monkeypatch.setenv("RAYSPEED_PDL", "0")
    expected = tokens()
    monkeypatch.setenv("RAYSPEED_PDL", "1")
    assert tokens() == expected


def test_prefill_graph_logits_equal_eager_logits():
    """The padded graph replay returns each prompt's last-token logits as the eager forward does (to
    rounding: cuBLAS may pick another algorithm for the padded row count)."""
    _, engine = generate(tiny_model("gpt_neo"))
    runner = engine.runner
    seqs = [Sequence(p, SamplingParams()) for p in PROMPTS]
    for seq in seqs:
        engine.block_manager.allocate(seq)
    try:
        ids, positions, meta = runner.prepare_prefill(seqs)
        graphed = runner.prefill_graphs.run(ids, positions, meta).clone()
        eager = runner._eager(ids, positions, meta, False)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    finally:
        for seq in seqs:
            engine.block_manager.deallocate(seq)
