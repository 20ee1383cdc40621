"""Stream batching in `LLMServer`: after a stream's first chunk, what comes within the stream interval
goes as one chunk per choice. The text, finish reasons and usage equal the unbatched stream's, in
fewer events: after the first, at most one batch per interval; with many streams open the interval
stretches so that all of them together send about `stream_events_per_s` events a second."""
import asyncio
import time

import pytest

from serve_apps.args import AppArgs
from serve_apps.demo_model import MODEL_NAME, demo_checkpoint
from serve_apps.protocol import CompletionRequest
from serve_apps.server import Chunk, _merge, start_server

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("RAYSPEED_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield demo_checkpoint()
    mp.undo()


async def streams(checkpoint: str, interval_s: float, n: int = 1, count: int = 1,
                  events_per_s: float | None = None) -> list[list[tuple[float, dict]]]:
    """(arrival time, event) of `count` concurrent 40-token streams of `n` samples each."""
    args = AppArgs.parse({"max_num_seqs": 8, "kv_cache_blocks": 64, "block_size": 8, "accelerator": "cpu",
                          "stream_interval_ms": interval_s * 1e3, "max_stream_events_per_s": events_per_s or 0})
    server = await start_server(args, checkpoint, MODEL_NAME)
    try:
        async def one(i: int):
            req = CompletionRequest(prompt=f"stream {i}", max_tokens=40, n=n, seed=3, temperature=0.8,
                                    ignore_eos=True, stream=True, stream_options={"include_usage": True})
            return [(time.monotonic(), event) async for event in server.complete_stream(req)]
        out = await asyncio.gather(*[one(i) for i in range(count)])
        assert server.open_streams == 0
        return out
    finally:
        await server.engine.shutdown()


def texts(events) -> tuple[dict, dict, dict]:
    text, reasons = {}, {}
    for _, e in events:
        for c in e["choices"]:
            text[c["index"]] = text.get(c["index"], "") + c["text"]
            reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    return text, reasons, events[-1][1]["usage"]


def text_events(events) -> int:
    return sum(bool(e["choices"]) for _, e in events)


def batches(events) -> list[list[tuple[float, dict]]]:
    """Text events grouped by when they came (one batch's events come back to back, batches an
    interval apart)."""
    out = []
    for t, e in events:
        if not e["choices"]:
            continue
        if out and t - out[-1][-1][0] < 0.01:
            out[-1].append((t, e))
        else:
            out.append([(t, e)])
    return out


def test_merge_joins_each_choices_chunks_in_order_up_to_an_error():
    error = RuntimeError("rank died")
    items = [Chunk(0, "a", None, 1), Chunk(1, "x", None, 1), Chunk(0, "b", None, 3), Chunk(1, "y", "stop", 2),
             error, Chunk(0, "c", None, 4)]
    assert _merge(items) == [Chunk(0, "ab", None, 3), Chunk(1, "xy", "stop", 2), error]
    assert _merge([Chunk(2, "", "length", 5)]) == [Chunk(2, "", "length", 5)]


def held_batches_apart(events, interval_s: float) -> bool:
    """Every batch that ends no sample came at least `interval_s` after the one before it."""
    found = batches(events)
    ends = [any(c["finish_reason"] for _, e in b for c in e["choices"]) for b in found]
    return all(end or b[0][0] - a[0][0] >= interval_s for a, b, end in zip(found, found[1:], ends[1:]))


@pytest.mark.parametrize("n", [1, 2])
def test_batched_stream_equals_the_unbatched_one_in_fewer_events(checkpoint, n):
    [every] = asyncio.run(streams(checkpoint, 0.0, n))
    [batched] = asyncio.run(streams(checkpoint, 0.04, n))
    assert texts(batched) == texts(every)
    assert texts(every)[1] == {i: "length" for i in range(n)} and texts(every)[2]["completion_tokens"] == 40 * n
    assert text_events(batched) < text_events(every)
    assert held_batches_apart(batched, 0.035), [b[0][0] for b in batches(batched)]


def test_many_open_streams_stretch_the_interval_to_the_event_budget(checkpoint):
    """4 streams, 50 events a second in all: each stream's batches 80 ms apart (but for its end)."""
    alone = asyncio.run(streams(checkpoint, 0.0, count=4))
    budgeted = asyncio.run(streams(checkpoint, 0.0, count=4, events_per_s=50))
    assert [texts(s) for s in budgeted] == [texts(s) for s in alone]
    assert all(held_batches_apart(s, 0.075) for s in budgeted), [[b[0][0] for b in batches(s)] for s in budgeted]
    assert sum(map(text_events, budgeted)) < sum(map(text_events, alone))


def test_a_samples_end_is_not_held_back_by_the_interval(checkpoint):
    """A 5 s interval: the first text at once, then the rest when the sample ends (well within 5 s)."""
    [every] = asyncio.run(streams(checkpoint, 0.0))
    [held] = asyncio.run(streams(checkpoint, 5.0))
    assert texts(held) == texts(every)
    assert text_events(held) == 2 and held[-1][0] - held[0][0] < 2.5


def test_a_non_streamed_answer_takes_the_engines_tokens_at_its_first_and_its_end(checkpoint):
    """Without stop strings, a non-streamed completion takes two deltas a sample from the engine loop
    (the first token, which gives back its queue reservation, and the end), where a stream at
    stream_interval_ms=0 takes one a step; both answers hold the same text."""
    async def run():
        args = AppArgs.parse({"max_num_seqs": 8, "kv_cache_blocks": 64, "block_size": 8, "accelerator": "cpu",
                              "stream_interval_ms": 0, "max_stream_events_per_s": 0})
        server = await start_server(args, checkpoint, MODEL_NAME)
        loop, deltas = server.engine.loop, []
        real = loop.stream

        async def counted(prompt, params, interval=None):
            deltas.append(0)
            async for delta in real(prompt, params, interval):
                deltas[-1] += 1
                yield delta
        loop.stream = counted
        try:
            fields = dict(prompt="paced", max_tokens=40, n=2, seed=3, temperature=0.8, ignore_eos=True)
            unary = await server.complete(CompletionRequest(**fields))
            streamed = [(0.0, e) async for e in server.complete_stream(
                CompletionRequest(**fields, stream=True, stream_options={"include_usage": True}))]
        finally:
            await server.engine.shutdown()
        return unary, streamed, deltas
    unary, streamed, deltas = asyncio.run(run())
    assert {c["index"]: c["text"] for c in unary["choices"]} == texts(streamed)[0]
    assert deltas[0] <= 4 < 40 <= deltas[1], deltas
