"""rayspeed: DeepSpeed-Inference's API on a Ray actor cluster.

Names are imported on first use, so `import rayspeed` (and the `rayspeed` launcher) stays light.
"""
import importlib

_EXPORTS = {
    "init_inference": "rayspeed.engine", "InferenceEngine": "rayspeed.engine",
    "InferenceConfig": "cluster.config", "ConfigError": "cluster.config",
    "InferenceGroup": "cluster.group", "GroupError": "cluster.tp_group",
    "PlacementError": "cluster.placement",
    "SamplingParams": "actors.sequence", "RequestError": "actors.sequence",
    "RequestOutput": "actors.outputs", "CompletionOutput": "actors.outputs",
    "CheckpointError": "actors.loader", "UnsupportedModelError": "policies.registry",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rayspeed' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
