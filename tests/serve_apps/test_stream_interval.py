"""Stream batching in `LLMServer`: after a stream's first chunk, what comes within `stream_interval_s`
goes as one chunk per choice. The text, finish reasons and usage equal the unbatched stream's, in fewer
events: after the first, at most one batch per interval."""
import asyncio
import time

import pytest

from actors.sharded_checkpoint import open_any
from cluster.tp_group import TPGroup
from serve_apps.args import AppArgs
from serve_apps.demo_model import MODEL_NAME, demo_checkpoint
from serve_apps.protocol import CompletionRequest
from serve_apps.server import LLMServer

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("RAYSPEED_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield demo_checkpoint()
    mp.undo()


async def stream(checkpoint: str, interval_s: float, n: int) -> list[tuple[float, dict]]:
    """(arrival time, event) of a 40-token stream of `n` samples."""
    args = AppArgs.parse({"max_num_seqs": 4, "kv_cache_blocks": 64, "block_size": 8, "accelerator": "cpu"})
    group = TPGroup(args.inference_config(checkpoint, False), None)
    await group.start(checkpoint)
    try:
        ckpt = open_any(checkpoint, None, 0, 1)
        server = LLMServer(group, ckpt.tokenizer(), MODEL_NAME, ckpt.generation_config(),
                           group.rank0.engine.max_seq_len, stream_interval_s=interval_s)
        req = CompletionRequest(prompt="stream me", max_tokens=40, n=n, seed=3, temperature=0.8, ignore_eos=True,
                                stream=True, stream_options={"include_usage": True})
        return [(time.monotonic(), event) async for event in server.complete_stream(req)]
    finally:
        await group.shutdown()


def texts(events) -> tuple[dict, dict, dict]:
    text, reasons = {}, {}
    for _, e in events:
        for c in e["choices"]:
            text[c["index"]] = text.get(c["index"], "") + c["text"]
            reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    return text, reasons, events[-1][1]["usage"]


@pytest.mark.parametrize("n", [1, 2])
def test_batched_stream_equals_the_unbatched_one_in_fewer_events(checkpoint, n):
    every = asyncio.run(stream(checkpoint, 0.0, n))
    batched = asyncio.run(stream(checkpoint, 0.25, n))
    assert texts(batched) == texts(every)
    assert texts(every)[1] == {i: "length" for i in range(n)} and texts(every)[2]["completion_tokens"] == 40 * n
    chunks = [(t, e) for t, e in batched if e["choices"]]
    assert len(chunks) < len([e for _, e in every if e["choices"]])
    # after the first, one batch per interval at most; a batch has one event per choice at most
    batches = []
    for t, e in chunks:
        if batches and t - batches[-1][-1][0] < 0.05:
            batches[-1].append((t, e))
        else:
            batches.append([(t, e)])
    assert all(len({c["index"] for _, e in b for c in e["choices"]}) == len(b) for b in batches)
    starts = [b[0][0] for b in batches]
    assert len(batches) > 1 and all(b - a >= 0.24 for a, b in zip(starts, starts[1:])), starts
