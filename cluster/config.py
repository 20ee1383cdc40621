"""`InferenceConfig`: every `init_inference` keyword, validated once at the door, frozen, and passed
whole to every actor. DeepSpeed's names and aliases are accepted (`mp_size`, `tp`, `kernel_inject`,
`injection_dict`, `max_tokens`, ...)."""
from typing import Any, Literal

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kernels.quant import QuantSpec


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


class WeightQuantConfig(BaseModel):
    """DeepSpeed's `quant.weight`, plus ours: `group_size` (along the input features) and
    `mlp_extra_grouping` (MoQ's second setting)."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: bool = Field(True, description="quantize the injected blocks' linears")
    num_bits: Literal[8, 4] = Field(8, description="8 (int8) or 4 (int4, group_size 128 by default)")
    q_type: Literal["symmetric"] = Field("symmetric", description="symmetric only")
    q_groups: int | None = Field(None, ge=1, description="int8 MoQ: groups of output rows per matrix part "
                                 "(default: one per row)")
    group_size: int | None = Field(None, ge=1, description="K-group size (int8 optional; int4 default 128)")
    mlp_extra_grouping: bool = Field(False, description="twice q_groups for the MLP's linears")
    quantized_initialization: dict = Field({}, description="DeepSpeed ZeRO-Inference only: must be empty")
    post_init_quant: dict = Field({}, description="DeepSpeed ZeRO-Inference only: must be empty")

    @field_validator("quantized_initialization", "post_init_quant")
    @classmethod
    def _empty(cls, value):
        if value:
            raise ValueError("per-module quantization settings are not supported; weights of every block "
                             "linear are quantized alike")
        return value


class ActivationQuantConfig(BaseModel):
    """DeepSpeed's `quant.activation`: accepted only disabled (activations stay in the compute dtype)."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: Literal[False] = Field(False, description="activation quantization is not supported")
    num_bits: int = 8
    q_type: Literal["symmetric", "asymmetric"] = "symmetric"
    q_groups: int = 1


class QKVQuantConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: bool = Field(True, description="quantize the fused QKV projection too")


class LMHeadQuantConfig(BaseModel):
    """Ours: an int8/int4 copy of the LM head (kernels/model.py `CausalLM.quantize_head`)."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: bool = Field(False, description="compute the logits from a copy of the LM head quantized like the "
                          "block linears (the float head stays: tied, it is the embedding table)")


class QuantConfig(BaseModel):
    """DeepSpeed's `quant={...}`; `activation_dtype` and `lm_head` are ours."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: bool = True
    weight: WeightQuantConfig = Field(default_factory=WeightQuantConfig)
    activation: ActivationQuantConfig = Field(default_factory=ActivationQuantConfig)
    qkv: QKVQuantConfig = Field(default_factory=QKVQuantConfig)
    lm_head: LMHeadQuantConfig = Field(default_factory=LMHeadQuantConfig)
    activation_dtype: Literal["float16", "bfloat16", "float32"] | None = Field(
        None, description="compute dtype of a quantized model (default: float16 on CUDA, float32 on CPU)")


class InferenceConfig(BaseModel):
    """The one configuration of an inference engine (and of every worker in its TP group)."""
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True,
                              arbitrary_types_allowed=True, protected_namespaces=())

    # What to run and how (DeepSpeed's keywords)
    dtype: str = Field("float16", description="float32 | float16 | bfloat16 | int8 | int4 (torch dtypes accepted)")
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
    quantization_setting: tuple[int, bool] | None = Field(
        None, description="int8 MoQ: groups, (groups, mlp_extra_grouping) or DeepSpeed's (mlp_extra_grouping, groups)")
    quant: QuantConfig | None = Field(None, description="DeepSpeed's quantization dict (with dtype int8/int4)")
    enable_cuda_graph: bool | None = Field(
        None, description="capture decode steps in CUDA graphs per batch bucket; default: on for CUDA devices")
    prefill_graph_tokens: int = Field(
        1024, ge=0, description="with CUDA graphs, capture the fresh-prefill graphs of steps of up to this many "
                                "tokens (every sequence-count bucket) at start-up, so serving never stops to capture "
                                "one; larger steps capture theirs on first use; 0: only steps of up to 16 tokens (the smallest "
                                "token bucket)")
    max_out_tokens: int = Field(1024, ge=1, validation_alias=AliasChoices("max_out_tokens", "max_tokens"),
                                description="most tokens (prompt + generated) one sequence may hold")
    min_out_tokens: int = Field(1, ge=1, description="accepted for DeepSpeed compatibility")

    # The engine (ours)
    device: str | None = Field(None, description="cuda:N / cpu; default: this rank's GPU, else cpu")
    max_num_seqs: int = Field(64, ge=1, description="most sequences in one running batch")
    max_num_batched_tokens: int = Field(4096, ge=1, description="prefill tokens per step (one prompt may exceed)")
    run_ahead: bool | None = Field(
        None, description="launch the next decode step before reading this one's tokens, where the GPU picks them "
                          "(greedy, or sampled without repetition penalty): hides the host's per-step work "
                          "behind the GPU; default: on for CUDA devices")
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
            raise ValueError(f"dtype {value!r} is not one of torch.float, torch.half, torch.bfloat16, torch.int8, "
                             "'int4'")
        return _DTYPES[value.lower()]

    @field_validator("quantization_setting", mode="before")
    @classmethod
    def _moq(cls, value):
        """(groups, mlp_extra_grouping) from an int or either tuple order (bool is an int: told apart first)."""
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value, False)
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"expected groups (int) or (groups, mlp_extra_grouping), got {value!r}")
        first, second = value
        if isinstance(first, bool) and isinstance(second, int) and not isinstance(second, bool):
            first, second = second, first                       # DeepSpeed's (mlp_extra_grouping, groups)
        if isinstance(first, bool) or not isinstance(first, int) or not isinstance(second, bool):
            raise ValueError(f"expected (groups: int, mlp_extra_grouping: bool) in either order, got {value!r}")
        if first < 1:
            raise ValueError(f"groups must be >= 1, got {first}")
        return first, second

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
        self._check_quant()
        return self

    def _check_quant(self) -> None:
        quant = self.quant if self.quant is not None and self.quant.enabled else None
        if self.dtype not in _QUANTIZED:
            for name, used in (("quantization_setting", self.quantization_setting is not None),
                               ("quant", quant is not None and (quant.weight.enabled or quant.lm_head.enabled))):
                if used:
                    raise ValueError(f"{name} quantizes weights: it needs dtype=torch.int8 (or 'int4'), "
                                     f"got dtype={self.dtype}")
            return
        weight = quant.weight if quant is not None else None
        if weight is not None and "num_bits" in weight.model_fields_set and self.dtype == "int4" and weight.num_bits == 8:
            raise ValueError(f"dtype=int4 but quant.weight.num_bits={weight.num_bits}")
        if self.quantization_setting is not None and weight is not None and weight.q_groups is not None:
            raise ValueError("quantization_setting and quant.weight.q_groups both set the groups: give one")
        try:
            self.weight_quant()
        except ValueError as e:
            raise ValueError(f"quantization_setting/quant: {e}") from None

    def weight_quant(self) -> QuantSpec | None:
        """How the injected blocks' linears are quantized; None for a float model."""
        if self.dtype not in _QUANTIZED:
            return None
        quant = self.quant if self.quant is not None and self.quant.enabled else QuantConfig()
        weight = quant.weight
        bits = 4 if self.dtype == "int4" else weight.num_bits
        groups, extra = self.quantization_setting or (weight.q_groups, weight.mlp_extra_grouping)
        if bits == 8 and groups is not None and weight.group_size is not None:
            raise ValueError("int8 takes row groups (MoQ) or a K group_size, not both")
        if bits == 4 and groups is not None:
            raise ValueError("int4 quantizes in K-groups of quant.weight.group_size (default 128); MoQ row "
                             "groups are for int8")
        group_size = weight.group_size or (128 if bits == 4 else None)
        return QuantSpec(bits, group_size, groups, extra, quant.qkv.enabled, quant.lm_head.enabled)

    @property
    def weight_bits(self) -> int | None:
        """8 or 4 for a quantized model, else None."""
        spec = self.weight_quant()
        return spec.bits if spec else None

    def compute_dtype(self, device: "torch.device | str | None" = None) -> torch.dtype:
        """The dtype of activations, embeddings, norms, LM head and biases: `dtype` for a float model;
        quantized, `quant.activation_dtype`, else float16 on CUDA and float32 elsewhere (CPU fp16
        matmuls are slow). `device` None: this config's device, else CUDA if available."""
        if self.dtype not in _QUANTIZED:
            return getattr(torch, self.dtype)
        if self.quant is not None and self.quant.activation_dtype:
            return getattr(torch, self.quant.activation_dtype)
        device = torch.device(device or self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return torch.float16 if device.type == "cuda" else torch.float32

    @property
    def tp_size(self) -> int:
        return self.mp_size or self.tensor_parallel.tp_size

    @property
    def torch_dtype(self) -> torch.dtype:
        """The compute dtype on this config's (default) device; see `compute_dtype`."""
        return self.compute_dtype()


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
