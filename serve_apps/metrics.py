"""Prometheus metrics through `ray.util.metrics` (exported by every Ray node's metrics agent)."""
from ray.util import metrics

_LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class ServerMetrics:
    def __init__(self, model: str):
        tags = {"model": model}
        self.ttft = metrics.Histogram("rayspeed_time_to_first_token_s", "Seconds from request to first token",
                                      boundaries=_LATENCY_BOUNDARIES, tag_keys=("model",))
        self.itl = metrics.Histogram("rayspeed_inter_token_latency_s",
                                     "Seconds a token between a request's deliveries (a delivery's wait over its "
                                     "tokens: the engine hands tokens over at most every stream interval)",
                                     boundaries=_LATENCY_BOUNDARIES, tag_keys=("model",))
        self.tokens = metrics.Counter("rayspeed_generated_tokens", "Tokens generated", tag_keys=("model",))
        self.queue = metrics.Gauge("rayspeed_queue_length", "Requests waiting for KV blocks", tag_keys=("model",))
        self.running = metrics.Gauge("rayspeed_batch_size", "Sequences in the running batch", tag_keys=("model",))
        self.kv_used = metrics.Gauge("rayspeed_kv_blocks_used", "KV-cache blocks in use", tag_keys=("model",))
        for m in (self.ttft, self.itl, self.tokens, self.queue, self.running, self.kv_used):
            m.set_default_tags(tags)

    def observe_tokens(self, count: int, first: bool, since: float) -> None:
        self.tokens.inc(count)
        if first:
            self.ttft.observe(since)
        else:
            self.itl.observe(since / count)

    def observe_engine(self, health: dict) -> None:
        self.queue.set(health["waiting"])
        self.running.set(health["running"])
        self.kv_used.set(health["kv_blocks_used"])
