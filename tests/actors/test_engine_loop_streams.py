"""`EngineLoop` hands tokens to asyncio callers: one hand-off per event loop a step, and a caller that
fell behind gets what piled up as one delta per sample; the tokens are the engine's, in order."""
import asyncio
import time

import pytest
import torch

import rayspeed
from actors.engine_loop import EngineLoop, StreamDelta, _joined
from actors.sequence import SamplingParams
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def engine():
    hf = tiny_model("gpt2")
    return rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=True, kv_cache_blocks=64,
                                   block_size=8).backend


def test_joined_merges_each_samples_deltas_up_to_its_end_and_stops_at_an_error():
    error = RuntimeError("boom")
    items = [StreamDelta(0, [1]), StreamDelta(1, [7]), StreamDelta(0, [2, 3]), StreamDelta(0, [4], "length"),
             StreamDelta(0, [9]), StreamDelta(1, [8], "stop"), error, StreamDelta(1, [5])]
    assert _joined(items) == [StreamDelta(0, [1, 2, 3, 4], "length"), StreamDelta(1, [7, 8], "stop"),
                              StreamDelta(0, [9]), error]


def test_a_caller_that_falls_behind_gets_joined_deltas_with_the_same_tokens(engine):
    params = SamplingParams(max_new_tokens=40, ignore_eos=True, n=2, do_sample=True, seed=1)
    expected = [s.token_ids for s in engine.generate([[5, 6, 7]], params)[0].outputs]
    loop = EngineLoop(engine)
    try:
        async def slow_reader() -> tuple[dict, list[int]]:
            tokens, sizes = {0: [], 1: []}, []
            async for delta in loop.stream([5, 6, 7], params):
                tokens[delta.index] += delta.token_ids
                sizes.append(len(delta.token_ids))
                time.sleep(0.05)                    # blocks the event loop: the engine steps on meanwhile
            return tokens, sizes
        tokens, sizes = asyncio.run(slow_reader())
    finally:
        loop.shutdown()
    assert [tokens[0], tokens[1]] == expected
    assert max(sizes) > 1 and len(sizes) < 80, sizes


def test_many_streams_of_one_event_loop_each_get_their_own_tokens(engine):
    prompts = [[i, i + 1, i + 2] for i in range(1, 13)]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
    loop = EngineLoop(engine)
    try:
        async def read(prompt):
            return [t async for d in loop.stream(prompt, params) for t in d.token_ids]

        async def all_streams():
            return await asyncio.gather(*[read(p) for p in prompts])
        assert asyncio.run(all_streams()) == expected
    finally:
        loop.shutdown()


def test_a_caller_whose_event_loop_closed_does_not_break_the_engine(engine):
    """A stream left open in an event loop that was closed (its generator never finalised, so nothing
    aborts its sequence): the engine keeps handing tokens to other callers."""
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    expected = engine.generate([[1, 2, 3]], params)[0].outputs[0].token_ids
    loop = EngineLoop(engine)
    try:
        gone = asyncio.new_event_loop()
        orphan = loop.stream([9, 9, 9], params)
        gone.run_until_complete(anext(orphan))              # its sequence runs; its loop closes under it
        gone.close()
        assert asyncio.run(loop.generate([[1, 2, 3]], params))[0].outputs[0].token_ids == expected
        assert loop.health()["alive"], loop.health()
    finally:
        loop.shutdown()


@pytest.mark.parametrize("interval", [float("inf"), 0.02])
def test_a_paced_stream_gets_at_most_one_delta_an_interval(engine, interval):
    """With `interval`, a sample's deltas come at most one an interval apart (inf: its first and its
    last), each holding every token since the one before: the same tokens as unpaced, in fewer
    deltas (the engine steps far more often than every 20 ms here)."""
    params = SamplingParams(max_new_tokens=30, ignore_eos=True, n=2, do_sample=True, seed=3)
    expected = [s.token_ids for s in engine.generate([[4, 5, 6]], params)[0].outputs]
    loop = EngineLoop(engine)
    try:
        async def read():
            tokens, deltas = {0: [], 1: []}, {0: 0, 1: 0}
            start = time.monotonic()
            async for delta in loop.stream([4, 5, 6], params, lambda: interval):
                tokens[delta.index] += delta.token_ids
                deltas[delta.index] += 1
            return tokens, deltas, time.monotonic() - start
        tokens, deltas, elapsed = asyncio.run(read())
    finally:
        loop.shutdown()
    assert [tokens[0], tokens[1]] == expected
    most = 2 if interval == float("inf") else elapsed / interval + 2       # the first, the last, one an interval
    assert all(1 <= count <= most for count in deltas.values()), (deltas, elapsed)
