"""`init_inference` arguments fuzzed lightly: the config door either accepts them or raises a
`ConfigError` naming the argument, never another exception type; `init_inference` refuses them the
same way before loading anything."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rayspeed
from cluster.config import ConfigError, InferenceConfig, make_config
from tests.helpers import tiny_model

anything = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | \
    st.lists(st.integers() | st.text(max_size=3), max_size=2) | \
    st.dictionaries(st.text(max_size=6), st.integers() | st.text(max_size=3), max_size=2)
TYPED = {int: st.integers(-2, 64), float: st.floats(-1, 2), str: st.sampled_from(["fp16", "float", "int8", "cpu", ""]),
         bool: st.booleans()}
CANONICAL = {}                                           # every accepted name (aliases too) -> field name
for name, field in InferenceConfig.model_fields.items():
    CANONICAL[name] = name
    for alias in getattr(field.validation_alias, "choices", []):
        CANONICAL[alias] = name
VALUES = {name: TYPED.get(InferenceConfig.model_fields[CANONICAL[name]].annotation, anything) | anything
          for name in CANONICAL}
VALUES["tensor_parallel"] = VALUES["tp"] = st.fixed_dictionaries({"tp_size": st.integers(-1, 3) | anything}) | anything
kwargs = st.lists(st.sampled_from(sorted(CANONICAL) + ["bogus"]), max_size=4, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: VALUES.get(k, anything) for k in keys}))
FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def hf():
    return tiny_model("gpt2")


def names_a_key(message: str, kw: dict) -> bool:
    return any(key in message or CANONICAL.get(key, key) in message for key in kw)


@FUZZ
@given(kw=kwargs)
def test_fuzzed_config_arguments_are_accepted_or_a_config_error_naming_them(hf, kw):
    try:
        make_config(**kw)
    except ConfigError as e:
        assert names_a_key(str(e), kw), (kw, str(e))
        with pytest.raises(ConfigError) as door:                 # the real door, before any load
            rayspeed.init_inference(hf, **kw)
        assert str(door.value) == str(e)


@pytest.mark.parametrize("kw, named", [
    ({"injection_policy": {"GPT2Block": ("attn.c_proj",)}, "replace_with_kernel_inject": True}, "injection_policy"),
    ({"quantization_setting": 8}, "quantization_setting"),
    ({"checkpoint": {"type": "Megatron", "checkpoints": []}}, "replace_with_kernel_inject"),
    ({"dtype": torch.float64}, "dtype"),
    ({"config": ["not", "a", "dict"]}, "config"),
])
def test_arguments_valid_alone_but_unsupported_are_refused_before_loading(hf, kw, named):
    with pytest.raises(ConfigError, match=named):
        rayspeed.init_inference(hf, **kw)


@pytest.mark.parametrize("kw", [{"device": "nonsense"}, {"device": "cuda:0"} if not torch.cuda.is_available() else
                                {"device": "nonsense:0"}, {"config": {1: 2}}])
def test_device_and_config_keys_are_validated_at_the_door(hf, kw):
    with pytest.raises(ConfigError):
        rayspeed.init_inference(hf, dtype=torch.float32, replace_with_kernel_inject=True, **kw)
