"""`InferenceConfig`: every `init_inference` keyword, validated once at the door, frozen, and passed
whole to every actor. DeepSpeed's names and aliases are accepted (`mp_size`, `tp`, `kernel_inject`,
`injection_dict`, `max_tokens`, ...)."""
from typing import Any, Literal

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A bad `init_inference` / `InferenceConfig` argument; the message names the field."""


_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "int8": "int8", "int4": "int4",
}
_QUANTIZED = ("int8", "int4")


class TensorParallelConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    tp_size: int = Field(1, ge=1, description="ranks in the tensor-parallel group")
    enabled: bool = Field(True, description="accepted for DeepSpeed compatibility; tp_size decides")


class InferenceConfig(BaseModel):
    """The one configuration of an inference engine (and of every worker in its TP group)."""
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True,
                              arbitrary_types_allowed=True, protected_namespaces=())

    # What to run and how (DeepSpeed's keywords)
    dtype: str = Field("float16", description="float32 | float16 | bfloat16 (torch dtypes accepted)")
    tensor_parallel: TensorParallelConfig = Field(
        default_factory=TensorParallelConfig, validation_alias=AliasChoices("tensor_parallel", "tp"))
    mp_size: int | None = Field(None, ge=1, description="DeepSpeed's old name for tensor_parallel.tp_size")
    replace_with_kernel_inject: bool = Field(
        False, validation_alias=AliasChoices("replace_with_kernel_inject", "kernel_inject"),
        description="swap the HF blocks for the fused, policy-driven decoder")
    replace_method: Literal["auto"] = Field("auto", description="accepted for DeepSpeed compatibility")
    injection_policy: dict[Any, tuple[str, ...]] | None = Field(
        None, validation_alias=AliasChoices("injection_policy", "injection_dict"),
        description="AutoTP: {HF block class or name: (names of its row-parallel linears, ...)}")
    checkpoint: str | dict | None = Field(None, description="checkpoint description (json path/dict) or URI")
    base_dir: str = Field("", description="directory the checkpoint description's paths are relative to")
    save_mp_checkpoint_path: str | None = Field(None, description="write per-rank shards here after loading")
    quantization_setting: int | tuple | None = Field(None, description="MoQ: groups, or (groups, mlp_extra_grouping)")
    enable_cuda_graph: bool | None = Field(
        None, description="capture decode steps in CUDA graphs per batch bucket; default: on for CUDA devices")
    max_out_tokens: int = Field(1024, ge=1, validation_alias=AliasChoices("max_out_tokens", "max_tokens"),
                                description="most tokens (prompt + generated) one sequence may hold")
    min_out_tokens: int = Field(1, ge=1, description="accepted for DeepSpeed compatibility")

    # The engine (ours)
    device: str | None = Field(None, description="cuda:N / cpu; default: this rank's GPU, else cpu")
    max_num_seqs: int = Field(64, ge=1, description="most sequences in one running batch")
    max_num_batched_tokens: int = Field(4096, ge=1, description="prefill tokens per step (one prompt may exceed)")
    block_size: int = Field(16, ge=1, description="tokens per KV-cache block")
    kv_cache_blocks: int | None = Field(None, ge=1, description="KV-cache blocks; default: sized from memory")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU memory share for weights + KV cache")
    cpu_kv_cache_bytes: int = Field(1 << 30, ge=1, description="KV-cache budget on CPU when kv_cache_blocks unset")

    # The TP group on Ray (ours)
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="placement-group strategy for the TP group's bundles")
    placement_timeout_s: float = Field(120.0, gt=0, description="wait this long for the placement group")
    rendezvous_timeout_s: float = Field(300.0, gt=0, description="torch.distributed init and collective timeout")
    worker_cpus: float = Field(1.0, ge=0, description="CPUs per worker bundle (GPU bundles also take 1 GPU)")
    storage_options: dict | None = Field(None, description="fsspec options for the checkpoint URI (s3 keys, endpoint)")

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_name(cls, value):
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        if not isinstance(value, str) or value.lower() not in _DTYPES:
            raise ValueError(f"dtype {value!r} is not one of torch.float, torch.half, torch.bfloat16, torch.int8")
        return _DTYPES[value.lower()]

    @field_validator("device")
    @classmethod
    def _device(cls, value):
        if value is not None:
            try:
                torch.device(value)
            except (RuntimeError, TypeError):
                raise ValueError(f"device {value!r} is not a torch device such as 'cuda:0' or 'cpu'") from None
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.mp_size is not None and self.tensor_parallel.tp_size not in (1, self.mp_size):
            raise ValueError(f"mp_size={self.mp_size} disagrees with tensor_parallel.tp_size="
                             f"{self.tensor_parallel.tp_size}")
        if self.dtype in _QUANTIZED:
            raise ValueError(f"dtype={self.dtype} (quantized inference) is not yet supported; "
                             "use torch.float, torch.half or torch.bfloat16")
        return self

    @property
    def tp_size(self) -> int:
        return self.mp_size or self.tensor_parallel.tp_size

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def make_config(config: "InferenceConfig | dict | None" = None, **kwargs) -> InferenceConfig:
    """`init_inference`'s `config=` (object or dict) merged with keyword arguments, as DeepSpeed does."""
    if isinstance(config, InferenceConfig):
        base = config.model_dump(exclude_unset=True)
    elif config is None or isinstance(config, dict):
        base = dict(config or {})
    else:
        raise ConfigError(f"config must be an InferenceConfig or a dict, got {type(config).__name__}")
    bad_keys = [k for k in base if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"invalid inference config: keys must be option names (strings), got {bad_keys!r}")
    try:
        return InferenceConfig(**{**base, **kwargs})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid inference config: {problems}") from None
