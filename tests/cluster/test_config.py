import pytest
import torch

from cluster.config import ConfigError, InferenceConfig, make_config


def test_deepspeed_names_and_aliases():
    c = make_config(mp_size=2, dtype=torch.half, kernel_inject=True, max_tokens=512, replace_method="auto",
                    injection_dict={"T5Block": ("SelfAttention.o",)})
    assert c.tp_size == 2 and c.dtype == "float16" and c.torch_dtype == torch.float16
    assert c.replace_with_kernel_inject and c.max_out_tokens == 512
    assert c.injection_policy == {"T5Block": ("SelfAttention.o",)}
    assert make_config(tensor_parallel={"tp_size": 4}).tp_size == 4
    assert make_config({"dtype": "bf16"}, tp={"tp_size": 2}).tp_size == 2


@pytest.mark.parametrize("dtype, name", [(torch.float, "float32"), (torch.float16, "float16"),
                                         (torch.bfloat16, "bfloat16"), ("fp16", "float16"), ("float", "float32")])
def test_dtypes(dtype, name):
    assert make_config(dtype=dtype).dtype == name


def test_frozen_and_passed_whole():
    c = make_config(dtype=torch.float)
    with pytest.raises(Exception):
        c.dtype = "float16"
    assert make_config(c, max_num_seqs=3).dtype == "float32"        # config= object merged with kwargs


@pytest.mark.parametrize("kwargs, field", [
    (dict(not_a_key=1), "not_a_key"),
    (dict(dtype="float8"), "dtype"),
    (dict(dtype=torch.int8, quantization_setting=0), "quantization_setting"),
    (dict(dtype=torch.half, quantization_setting=2), "quantization_setting.*needs dtype=torch.int8"),
    (dict(tensor_parallel={"tp_size": 0}), "tensor_parallel.tp_size"),
    (dict(tensor_parallel={"tp_sise": 2}), "tp_sise"),
    (dict(mp_size=2, tensor_parallel={"tp_size": 4}), "mp_size"),
    (dict(max_out_tokens=0), "max_out_tokens"),
    (dict(replace_method="inject"), "replace_method"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        make_config(**kwargs)


def test_config_rejects_non_mapping():
    with pytest.raises(ConfigError, match="InferenceConfig or a dict"):
        make_config(config=3)
    assert isinstance(InferenceConfig(), InferenceConfig)
