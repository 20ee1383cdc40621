"""Run-ahead decoding (the next step launched before this one's tokens are read) gives exactly
the tokens, stops and block accounting of lockstep decoding, on CPU where the same logic runs
synchronously."""
import asyncio
import time

import pytest
import torch

import rayspeed
from actors.sequence import SamplingParams
from tests.helpers import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def hf():
    return tiny_model("gpt_neo")


def engine(hf, run_ahead: bool, **config):
    e = rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=True, tokenizer=byte_tokenizer(),
                                run_ahead=run_ahead, **config).backend
    calls = []
    launch = e.runner.run_ahead
    e.runner.run_ahead = lambda seqs, ids: calls.append(len(seqs)) or launch(seqs, ids)
    return e, calls


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def tokens(outputs) -> list[tuple]:
    return [(c.token_ids, c.finish_reason) for o in outputs for c in o.outputs]


def test_same_tokens_and_stops_as_lockstep(hf):
    """Different lengths, a stop token met mid-batch (its extra token dropped), min_new_tokens."""
    ps = prompts(6, seed=4)
    lockstep, _ = engine(hf, False)
    free = lockstep.generate(ps, SamplingParams(max_new_tokens=20, ignore_eos=True))
    stop = free[2].outputs[0].token_ids[5]
    params = [SamplingParams(max_new_tokens=n, stop_token_ids=(stop,), min_new_tokens=m)
              for n, m in zip((20, 3, 20, 11, 17, 20), (0, 0, 0, 4, 0, 8))]
    expected = lockstep.generate(ps, params)
    ahead, calls = engine(hf, True)
    assert tokens(ahead.generate(ps, params)) == tokens(expected)
    assert any(o.outputs[0].finish_reason == "stop" for o in expected)
    assert sum(calls) > 0
    assert ahead.block_manager.num_free == ahead.block_manager.num_blocks and not ahead.scheduler.has_work()


def test_abort_between_steps_drops_the_launched_token(hf):
    ps = prompts(3, seed=5)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    runs = []
    for run_ahead in (False, True):
        e, calls = engine(hf, run_ahead)
        seqs = [e.add_request(p, params) for p in ps]
        for _ in range(4):
            e.step()
        e.abort(seqs[1])
        while e.scheduler.has_work():
            e.step()
        runs.append([(s.output_token_ids, s.finish_reason) for s in seqs])
        assert e.block_manager.num_free == e.block_manager.num_blocks
    assert runs[0] == runs[1] and runs[1][1][1] == "abort"
    assert len(runs[1][1][0]) < 16 and calls


def test_kv_cache_pressure_and_admissions_fall_back_to_lockstep(hf):
    """More requests than the batch holds: admissions and preemptions stop run-ahead for a step,
    results stay those of a roomy lockstep engine."""
    ps = prompts(10, seed=6)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    roomy, _ = engine(hf, False)
    tight, calls = engine(hf, True, kv_cache_blocks=8, block_size=8, max_num_seqs=4, max_out_tokens=64)
    assert tokens(tight.generate(ps, params)) == tokens(roomy.generate(ps, params))
    assert calls and tight.block_manager.num_free == 8


def test_sampling_in_the_batch_keeps_lockstep(hf):
    ps = prompts(3, seed=7)
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True),
              SamplingParams(max_new_tokens=8, ignore_eos=True, do_sample=True, seed=3),
              SamplingParams(max_new_tokens=8, ignore_eos=True, repetition_penalty=1.3)]
    lockstep, _ = engine(hf, False)
    ahead, calls = engine(hf, True)
    assert tokens(ahead.generate(ps, params)) == tokens(lockstep.generate(ps, params))
    assert calls == []


def test_sampled_sequences_run_ahead_too(hf):
    """Sampling without a seed or penalty picks on the GPU, so it runs ahead: top_k=1 (a draw with one
    candidate) gives the lockstep greedy tokens; unseeded temperature draws run ahead with every block
    returned and each sequence its full length."""
    ps = prompts(4, seed=8)
    lockstep, _ = engine(hf, False)
    expected = lockstep.generate(ps, SamplingParams(max_new_tokens=12, ignore_eos=True))
    ahead, calls = engine(hf, True)
    assert tokens(ahead.generate(ps, SamplingParams(max_new_tokens=12, ignore_eos=True, do_sample=True, top_k=1))) \
        == tokens(expected)
    assert sum(calls) > 0
    calls.clear()
    out = ahead.generate(ps, SamplingParams(max_new_tokens=12, ignore_eos=True, do_sample=True, temperature=0.9,
                                            top_p=0.95))
    assert sum(calls) > 0 and all(len(o.outputs[0].token_ids) == 12 for o in out)
    assert ahead.block_manager.num_free == ahead.block_manager.num_blocks


def test_seeded_sampling_runs_ahead_with_the_lockstep_tokens(hf):
    """A seeded draw's noise depends on the seed and the token's index, not on when the step runs: with
    run-ahead the seeded requests (n=2: two seeds) give exactly the lockstep tokens, and do run ahead."""
    ps = prompts(4, seed=9)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, do_sample=True, temperature=1.5, top_p=0.9,
                            seed=11, n=2)
    lockstep, _ = engine(hf, False)
    ahead, calls = engine(hf, True)
    expected = tokens(lockstep.generate(ps, params))
    assert tokens(ahead.generate(ps, params)) == expected and sum(calls) > 0
    assert len({tuple(t) for t, _ in expected}) == len(expected)   # every prompt and sample drew its own


def test_engine_loop_streams_cancels_and_admits_with_run_ahead(hf):
    """Through `EngineLoop` (the Serve replica's engine thread): requests arriving while others
    decode, a stream closed after three deltas; every answer equals lockstep, every block returns."""
    from actors.engine_loop import EngineLoop

    ps = prompts(5, seed=8)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    lockstep, _ = engine(hf, False)
    expected = [o.outputs[0].token_ids for o in lockstep.generate(ps, params)]
    ahead, calls = engine(hf, True)
    loop = EngineLoop(ahead)

    async def streamed(prompt):
        return [t async for delta in loop.stream(prompt, params) for t in delta.token_ids]

    async def closed_early(prompt):
        stream = loop.stream(prompt, params)
        for _ in range(3):
            await anext(stream)
        await stream.aclose()                                      # the client went away: abort

    async def main():
        first = [asyncio.create_task(streamed(p)) for p in ps[:3]]
        await asyncio.sleep(0.05)                                  # the others join a running batch
        cancelled = asyncio.create_task(closed_early(ps[4]))
        late = await loop.generate([ps[3]], params)
        await cancelled
        return [await t for t in first] + [late[0].outputs[0].token_ids]

    try:
        got = asyncio.run(main())
        assert got == expected[:4] and calls
        deadline = time.monotonic() + 10                          # the abort lands at the next step boundary
        while ahead.block_manager.num_free != ahead.block_manager.num_blocks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ahead.block_manager.num_free == ahead.block_manager.num_blocks
    finally:
        loop.shutdown()

