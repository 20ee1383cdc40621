"""`serve run serve_apps.gpt_neo:app [model=... tp_size=2 ...]`: GPT-Neo behind OpenAI routes.

Without `model`: on a cluster with GPUs, EleutherAI/gpt-neo-2.7B (from the local HF cache or the
hub); without GPUs, the embedded tiny GPT-Neo with RANDOM weights (its name says so), built offline.
"""
from serve_apps.args import AppArgs
from serve_apps.demo_model import MODEL_NAME, demo_checkpoint
from serve_apps.llm import build_app, resolve_model

GPU_DEFAULT = "EleutherAI/gpt-neo-2.7B"


def _default(args: AppArgs) -> str:
    return resolve_model(GPU_DEFAULT) if args.use_gpu() else demo_checkpoint()


def app(args: dict | None = None):
    args = AppArgs.parse(args)
    if args.model is None and not args.use_gpu() and args.served_model_name is None:
        args = args.model_copy(update={"served_model_name": MODEL_NAME})
    return build_app(args, _default)


def __getattr__(name: str):
    """`serve_apps.gpt_neo:application`: the app with default arguments, built on first access, for
    tools that want an Application rather than a builder (`serve build serve_apps.gpt_neo:application`)."""
    if name == "application":
        return app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
