"""Serve app arguments fuzzed lightly: the builder either returns an application or raises a
ValueError naming the offending argument, never another exception type."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve

from serve_apps.args import AppArgs
from serve_apps.demo_model import build
from serve_apps.gpt_neo import app as gpt_neo_app

anything = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | \
    st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)
TYPED = {int: st.integers(-2, 5) | st.sampled_from([2**63, 10**30]),
         float: st.floats(-1, 100) | st.sampled_from([0.0, float("inf"), float("nan"), 1e308]),
         str: st.text(max_size=12)}


def typed(annotation) -> st.SearchStrategy:
    return TYPED.get(annotation, anything)


FIELDS = {name: typed(f.annotation) | anything | st.text(max_size=6).map(str)      # `serve run k=v` gives strings
          for name, f in AppArgs.model_fields.items() if name != "model"}
app_args = st.dictionaries(st.sampled_from(sorted(FIELDS)) | st.sampled_from(["nope", "tp", ""]),
                           st.none(), max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: FIELDS.get(k, anything) for k in keys}))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("demo")))


@settings(max_examples=80, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=app_args)
def test_fuzzed_app_arguments_build_or_name_the_bad_one(checkpoint, args):
    args = {**args, "model": checkpoint}
    try:
        application = gpt_neo_app(args)
    except ValueError as e:
        assert any(f"{key}:" in str(e) or f"{key}=" in str(e) for key in args), (args, str(e))
        return
    assert isinstance(application, serve.Application)
    parsed = AppArgs.parse(args)
    assert parsed.min_replicas <= parsed.max_replicas


@pytest.mark.parametrize("args", ["tp_size=2", ["tp_size", 2], 5])
def test_app_arguments_that_are_not_a_mapping_are_a_value_error(args):
    with pytest.raises(ValueError, match="invalid app arguments: args: Input should be a valid dictionary"):
        AppArgs.parse(args)


@pytest.mark.parametrize("field", ["replica_cpus", "step_timeout_s", "health_check_period_s"])
def test_non_finite_numbers_are_refused(field):
    with pytest.raises(ValueError, match=f"{field}: Input should be a finite number"):
        AppArgs.parse({field: "inf"})
