"""`EngineLoop` under failure, on a tiny model without Ray: a stalled step (watchdog), a failed group,
a step that raises, a cancelled caller, and sampling values that would break a step. Every request
in flight ends with a clear error, never a hang."""
import asyncio
import threading
import time

import pytest
import torch

import rayspeed
from actors.engine_loop import EngineError, EngineLoop
from actors.sequence import RequestError, SamplingParams
from tests.helpers import tiny_model

LONG = SamplingParams(max_new_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def hf():
    return tiny_model("llama")


@pytest.fixture
def loop(hf):
    engine = rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=True, kv_cache_blocks=64,
                                     block_size=8).backend
    loop = EngineLoop(engine)
    yield loop
    loop.shutdown()


def stall_after_first_step(loop: EngineLoop) -> tuple[threading.Event, threading.Event]:
    """Make every step after the first block (as rank 0 does in a collective with a stopped rank)."""
    step, stalled, release = loop.engine.step, threading.Event(), threading.Event()

    def stalling_step():
        if loop.steps >= 1:
            stalled.set()
            release.wait(30)
        return step()
    loop.engine.step = stalling_step
    return stalled, release


async def outcome(coro, timeout: float = 10.0):
    try:
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"no answer within {timeout}s: a hang") from None
    except Exception as e:
        return e


async def drain(stream) -> list:
    return [delta async for delta in stream]


def test_stalled_step_fails_running_and_queued_requests_within_the_timeout(loop):
    stalled, release = stall_after_first_step(loop)
    loop.watch_steps(0.5)

    async def run():
        running = asyncio.ensure_future(outcome(loop.generate([[1, 2, 3]], LONG)))
        streaming = asyncio.ensure_future(outcome(drain(loop.stream([4, 5], LONG))))
        await asyncio.to_thread(stalled.wait, 10)
        queued = asyncio.ensure_future(outcome(loop.generate([[6]], LONG)))     # waits in the inbox
        start = time.monotonic()
        results = await asyncio.gather(running, streaming, queued)
        return results, time.monotonic() - start

    try:
        results, elapsed = asyncio.run(run())
    finally:
        release.set()
    assert elapsed < 3.0
    for error in results:
        assert isinstance(error, EngineError) and "step_timeout_s=0.5" in str(error), error
    health = loop.health()
    assert not health["alive"] and "stalled" in health["error"]
    with pytest.raises(EngineError, match="engine failed earlier"):
        asyncio.run(loop.generate([[1]], LONG))


def test_fail_from_another_thread_ends_queued_requests_too(loop):
    stalled, release = stall_after_first_step(loop)

    async def run():
        running = asyncio.ensure_future(outcome(loop.generate([[1, 2, 3]], LONG)))
        await asyncio.to_thread(stalled.wait, 10)
        queued = asyncio.ensure_future(outcome(loop.generate([[6]], LONG)))
        await asyncio.sleep(0.1)
        threading.Thread(target=loop.fail, args=(EngineError("rank 1 died"),)).start()
        return await asyncio.gather(running, queued)

    try:
        results = asyncio.run(run())
    finally:
        release.set()
    assert all(isinstance(e, EngineError) and "rank 1 died" in str(e) for e in results), results


def test_step_that_raises_fails_everyone_and_the_loop_reports_dead(loop):
    def broken_step():
        raise RuntimeError("Connection reset by peer")
    loop.engine.step = broken_step
    error = asyncio.run(outcome(loop.generate([[1, 2, 3]], LONG)))
    assert isinstance(error, EngineError) and "Connection reset by peer" in str(error)
    deadline = time.monotonic() + 5
    while loop._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not loop.health()["alive"]


def test_cancelled_generate_frees_its_kv_blocks_at_the_next_step(loop):
    async def run():
        task = asyncio.ensure_future(loop.generate([[1, 2, 3], [4, 5]], LONG))
        while loop.health()["kv_blocks_used"] == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        deadline = time.monotonic() + 5
        while loop.health()["kv_blocks_used"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return await loop.generate([[7, 8]], SamplingParams(max_new_tokens=3, ignore_eos=True))

    out = asyncio.run(run())
    health = loop.health()
    assert health["kv_blocks_used"] == 0 and health["running"] == 0 and health["alive"]
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("fields, named", [
    ({"do_sample": True, "temperature": 1e-300}, "temperature"),
    ({"do_sample": True, "repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"do_sample": True, "top_k": 2**70}, "top_k"),
    ({"do_sample": True, "seed": 2**64}, "seed"),
    ({"stop_token_ids": (10**30,), "min_new_tokens": 2}, "stop_token_ids"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"),
])
def test_sampling_values_that_would_break_a_step_fail_alone(loop, fields, named):
    async def run():
        bad = await outcome(loop.generate([[1, 2]], SamplingParams(max_new_tokens=4, **fields)))
        good = await loop.generate([[1, 2]], SamplingParams(max_new_tokens=4, ignore_eos=True))
        return bad, good

    bad, good = asyncio.run(run())
    assert isinstance(bad, RequestError) and named in str(bad), bad
    assert len(good[0].outputs[0].token_ids) == 4 and loop.health()["alive"]
