"""rayspeed: DeepSpeed-Inference's API on a Ray actor cluster."""
from actors.loader import CheckpointError
from actors.outputs import CompletionOutput, RequestOutput
from actors.sequence import RequestError, SamplingParams
from cluster.config import ConfigError, InferenceConfig
from policies.registry import UnsupportedModelError
from rayspeed.engine import InferenceEngine, init_inference

__all__ = ["init_inference", "InferenceEngine", "InferenceConfig", "SamplingParams", "RequestOutput",
           "CompletionOutput", "ConfigError", "CheckpointError", "RequestError", "UnsupportedModelError"]
__version__ = "0.1.0"
