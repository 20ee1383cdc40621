"""`AppArgs`: the arguments of a serving app (`serve run serve_apps.gpt_neo:app tp_size=2 ...`,
or `args:` in a Serve config YAML), validated with the field named on error; and the engine's
`InferenceConfig` and the deployment's options derived from them."""
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.config import InferenceConfig


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)

    model: str | None = Field(None, description="HF model dir, fsspec URI (s3://, gs://) or hub id; default: "
                                                "the app's default (the tiny demo model without GPUs)")
    served_model_name: str | None = Field(None, description="name in /v1/models and responses")
    tp_size: int = Field(1, ge=1)
    dtype: str | None = Field(None, description="default float16 on GPU, float32 on CPU")
    accelerator: Literal["auto", "gpu", "cpu"] = "auto"
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    replica_cpus: float = Field(1.0, ge=0, description="CPUs of the replica (rank 0) in bundle 0")
    worker_cpus: float = Field(1.0, ge=0, description="CPUs of each other rank's bundle")
    block_size: int = Field(16, ge=1)
    kv_cache_blocks: int | None = Field(None, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_model_len: int | None = Field(None, ge=2, description="tokens per sequence (default: model's maximum)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    storage_options: dict | None = None
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(60, ge=0)
    metrics_interval_s: float = Field(10, gt=0, description="how often replicas report their load (Serve's default)")
    look_back_period_s: float = Field(30, gt=0, description="the window the autoscaler averages load over")
    max_ongoing_requests: int = Field(256, ge=1, description="per replica, before Serve queues at the router")
    max_queued_requests: int = Field(1024, ge=1, description="engine queue limit; beyond it HTTP 503")
    router_queue_limit: int = Field(4096, ge=1, description="requests Serve's router holds for a replica slot "
                                                            "(beyond max_ongoing_requests); beyond it HTTP 503")
    stream_interval_ms: float = Field(20, ge=0, description="a stream sends its first text at once, then what has "
                                                            "come at most this often (Serve's proxy costs per event); "
                                                            "0: every token as it comes")
    max_stream_events_per_s: float = Field(500, ge=0, description="with many streams open, each sends less often, so "
                                                                  "that all send about this many events a second (the "
                                                                  "node's one proxy serves every replica); 0: no bound")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer <key>' (or RAYSPEED_API_KEY)")
    max_body_bytes: int = Field(1 << 20, ge=1024)
    health_check_period_s: float = Field(10, gt=0)
    stall_timeout_s: float = Field(120, gt=0, description="unhealthy when work waits this long without a step")
    step_timeout_s: float = Field(300, gt=0, description="one engine step running longer (a TP rank stalled in "
                                                         "a collective) fails the requests in flight; unhealthy")

    @model_validator(mode="after")
    def _check(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}")
        return self

    @classmethod
    def parse(cls, args: "dict | AppArgs | None") -> "AppArgs":
        """From `serve run k=v` strings or YAML values; an error names the bad argument."""
        if isinstance(args, AppArgs):
            return args
        try:
            return cls.model_validate(args or {})
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'args'}: {err['msg']}" for err in e.errors())
            raise ValueError(f"invalid app arguments: {problems}") from None

    @property
    def key(self) -> str | None:
        return self.api_key or os.environ.get("RAYSPEED_API_KEY") or None

    def use_gpu(self) -> bool:
        if self.accelerator != "auto":
            return self.accelerator == "gpu"
        import ray
        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
        import torch
        return torch.cuda.is_available()

    def inference_config(self, checkpoint: str, use_gpu: bool) -> InferenceConfig:
        return InferenceConfig(
            checkpoint=checkpoint, tensor_parallel={"tp_size": self.tp_size}, replace_with_kernel_inject=True,
            dtype=self.dtype or ("float16" if use_gpu else "float32"), block_size=self.block_size,
            kv_cache_blocks=self.kv_cache_blocks, max_num_seqs=self.max_num_seqs,
            max_out_tokens=self.max_model_len or 1 << 20, gpu_memory_utilization=self.gpu_memory_utilization,
            storage_options=self.storage_options, worker_cpus=self.worker_cpus,
            placement_strategy=self.placement_strategy)

    def deployment_options(self, use_gpu: bool) -> dict:
        """One replica = one TP group: bundle 0 holds the replica (rank 0), bundles 1.. the other ranks."""
        gpu = {"GPU": 1} if use_gpu else {}
        bundles = [{"CPU": self.replica_cpus, **gpu}] + [{"CPU": self.worker_cpus, **gpu}] * (self.tp_size - 1)
        return {
            "ray_actor_options": {"num_cpus": self.replica_cpus, "num_gpus": 1 if use_gpu else 0},
            "placement_group_bundles": bundles, "placement_group_strategy": self.placement_strategy,
            "max_ongoing_requests": self.max_ongoing_requests, "max_queued_requests": self.router_queue_limit,
            "health_check_period_s": self.health_check_period_s,
            "autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                   "initial_replicas": max(1, self.min_replicas),
                                   "target_ongoing_requests": self.target_ongoing_requests,
                                   "upscale_delay_s": self.upscale_delay_s,
                                   "downscale_delay_s": self.downscale_delay_s,
                                   "metrics_interval_s": self.metrics_interval_s,
                                   "look_back_period_s": self.look_back_period_s},
        }
