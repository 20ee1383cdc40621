"""Checkpoint descriptions on a Ray TP group: Megatron checkpoints saved at MP 1, 2, 4 load at TP 2
and 4 with HF's logits and greedy tokens; each rank reads only its share; the driver never holds
the weights (its RSS stays far below the checkpoint's size)."""
import os
import threading
import time

import pytest
import ray
import torch
import transformers as tf

import rayspeed
from actors.worker import rss_mb
from tests.cluster.test_tp import TP, free_cpus_settle, rel_err, shard_bytes
from tests.helpers import tiny_model
from tests.megatron_writer import write_megatron

pytestmark = pytest.mark.usefixtures("ray_cluster")


def report(engine) -> list[dict]:
    return ray.get(engine.backend.group.model_info.remote())["report"]["ranks"]


@pytest.mark.parametrize("mp, tp_size", [(1, 2), (4, 2), (2, 4)])
def test_megatron_at_another_tp_matches_hf(mp, tp_size, tmp_path):
    hf = tiny_model("gpt2")
    files = write_megatron(hf, str(tmp_path), mp, version=3.0 if mp != 4 else 1.0)
    hf.config.to_json_file(tmp_path / "config.json")
    description = {"type": "Megatron", "version": 0.0, "checkpoints": files}
    engine = rayspeed.init_inference(checkpoint=description, base_dir=str(tmp_path),
                                     tensor_parallel={"tp_size": tp_size}, **TP)
    try:
        ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = hf(ids).logits
        assert rel_err(engine.module(ids).logits, expected) < 1e-4
        greedy = dict(max_new_tokens=16, min_new_tokens=16)
        assert torch.equal(engine.module.generate(ids, **greedy), hf.generate(ids, **greedy))
        for rank in report(engine):                  # its shard; padding rows and the pickles are not read
            assert rank["bytes_read"] <= shard_bytes(hf, rank["rank"], tp_size) + 64 * 1024
    finally:
        engine.shutdown()
    assert free_cpus_settle() == 4.0


class PeakRSS:
    """This process's peak resident memory above its level at the start, sampled every 5 ms."""

    def __enter__(self):
        self.peak, self.done, self.base = 0, threading.Event(), rss_mb() * 2**20
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, rss_mb() * 2**20 - self.base)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def test_driver_never_holds_the_weights(tmp_path):
    """~78 MB of weights saved at MP 2, loaded at TP 2: the model config comes from the files' args
    (the driver maps file 0 to read them), the weights only ever reach the ranks."""
    config = tf.GPT2Config(vocab_size=320, n_embd=512, n_layer=6, n_head=8, n_positions=1024)
    torch.manual_seed(0)
    hf = tf.GPT2LMHeadModel(config).eval()
    files = write_megatron(hf, str(tmp_path), 2)
    size = sum(os.path.getsize(tmp_path / f) for f in files)
    assert 60e6 < size < 100e6
    description = {"type": "Megatron", "version": 0.0, "checkpoints": files}
    rayspeed.init_inference(tiny_model("gpt2"), **TP).module(torch.tensor([[1, 2]]))      # imports warmed up
    with PeakRSS() as rss:
        start = time.perf_counter()
        engine = rayspeed.init_inference(checkpoint=description, base_dir=str(tmp_path), kv_cache_blocks=64,
                                         tensor_parallel={"tp_size": 2}, **TP)
        elapsed = time.perf_counter() - start
    try:
        ranks = report(engine)
        print(f"\ncheckpoint {size / 1e6:.1f} MB; driver peak RSS growth {rss.peak / 1e6:.1f} MB; "
              f"init_inference {elapsed:.1f} s")
        for r in ranks:
            print(f"rank {r['rank']}: read {r['bytes_read'] / 1e6:.1f} MB in {r['load_s']:.2f} s, RSS "
                  f"{r['rss_before_mb']:.0f} MiB before, peak {r['peak_rss_mb']:.0f} MiB")
        assert rss.peak < 0.25 * size
        assert all((r["peak_rss_mb"] - r["rss_before_mb"]) * 2**20 < 1.6 * size for r in ranks)
        assert all(0.45 * size < r["bytes_read"] < 0.55 * size for r in ranks)
        ids = torch.randint(0, 320, (1, 24))
        with torch.no_grad():
            expected = hf(ids).logits
        assert rel_err(engine.module(ids).logits[..., :320], expected) < 1e-4
    finally:
        engine.shutdown()
    assert free_cpus_settle() == 4.0
