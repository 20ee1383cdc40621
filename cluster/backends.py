"""Where a model runs, chosen from the config and the process it is called in:

- `local`: tp_size 1, in this process (a model object, or a checkpoint read through fsspec);
- `spmd`: tp_size N inside a script started N times by a launcher (`rayspeed --num_gpus N`, or
  torch.distributed already initialised): each process builds its shard in-process, as DeepSpeed;
- `ray`: tp_size N from a single driver: an `InferenceGroup` of N Ray actors;
- `auto_tp`: no kernel injection: the HF model itself, its blocks sharded in place in each rank's
  process (AutoTP, DeepSpeed's `injection_policy`), under a launcher like `spmd`.

Each but `auto_tp` returns a `Model` with the backend and what the HF drop-in needs.
"""
import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from actors.build import build_engine, default_device, load_engine
from actors.checkpoint import save_checkpoint
from actors.cuda_graphs import destroy_process_group
from actors.descriptions import is_description, resolve_description
from actors.sharded_checkpoint import open_any, save_shards
from cluster.config import ConfigError, InferenceConfig
from kernels.linear import SINGLE, TensorParallel, host_group
from policies.auto_tp import AutoTPError, plan, shard_in_place


@dataclass
class Model:
    backend: object
    hf_config: object
    generation_config: object
    tokenizer: object = None


def launched_spmd() -> bool:
    return dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1


def local(model, config: InferenceConfig, tp: TensorParallel = SINGLE, device=None, tokenizer=None) -> Model:
    if config.device and torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={config.device!r}, but CUDA is not available in this process")
    if config.checkpoint is not None:
        ckpt = open_any(described(model, config), config.storage_options, tp.rank, tp.size)
        engine = load_engine(ckpt, config, tp, device)
        return Model(engine, ckpt.hf_config(), ckpt.generation_config(), ckpt.tokenizer())
    if model is None:
        raise ConfigError("init_inference needs a model object or checkpoint='dir-or-fsspec-URI'")
    state = model.state_dict()
    generation_config = getattr(model, "generation_config", None)
    engine = build_engine(model.config, state.items(), config, tp, len(state), device, tp.rank == 0)
    if config.save_mp_checkpoint_path:
        save_shards(engine.model, config.save_mp_checkpoint_path, config.storage_options, model.config,
                    generation_config, tokenizer)
    return Model(engine, model.config, generation_config)


def described(model, config: InferenceConfig):
    """`config.checkpoint`; a description resolved here (paths against `base_dir`, the model config from
    `model` when given), so that every rank loads the same thing. Raises `CheckpointError`."""
    if is_description(config.checkpoint):
        return resolve_description(config.checkpoint, config.base_dir, config.storage_options, model, config.tp_size)
    return config.checkpoint


def spmd(model, config: InferenceConfig, tokenizer=None) -> Model:
    """Join (or initialise from the launcher's env) the process group and build this rank's shard."""
    tp, device = _join_launched_group(config)
    return local(model, config, tp, device, tokenizer)


def _join_launched_group(config: InferenceConfig) -> tuple[TensorParallel, torch.device]:
    """This process's place in the launched world (initialised from the launcher's env if need be),
    and its device (the LOCAL_RANK-th GPU unless `config.device` says otherwise)."""
    on_gpu = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method="env://",
                                timeout=timedelta(seconds=config.rendezvous_timeout_s))
        atexit.register(_leave_group)          # ours to tear down, before the interpreter's own teardown
    if dist.get_world_size() != config.tp_size:
        raise ConfigError(f"tensor_parallel.tp_size={config.tp_size} but the launched world has "
                          f"{dist.get_world_size()} processes")
    device = default_device(config)
    if on_gpu and not config.device:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    plans = host_group(device, timedelta(seconds=config.rendezvous_timeout_s))
    return TensorParallel(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, plans), device


def _leave_group() -> None:
    """Destroy the process group this module started. Left to interpreter shutdown, its threads
    can be torn down out of order ("terminate called without an active exception": the rank aborts
    and loses its buffered stdout). The decode graphs are reset first (`destroy_process_group`)."""
    destroy_process_group()


def auto_tp(model, config: InferenceConfig) -> torch.nn.Module:
    """Without kernel injection, AutoTP: the HF model itself with its blocks sharded in place for this
    rank (see `policies.auto_tp`), in `config.torch_dtype` on this rank's device. Every rank runs the same
    script, so they all build the full model and each keeps its shard. tp_size 1: the model as it
    is (a given `injection_policy` is only checked against it), as DeepSpeed does.

    The ranks also adopt rank 0's torch RNG state, so sampling (HF `generate(do_sample=True)` on the
    module, or `engine.generate`) draws the same tokens on every rank as long as they make the same
    calls; a rank that draws random numbers on its own afterwards makes them diverge."""
    if model is None:
        raise ConfigError("replace_with_kernel_inject=False runs (and with tp_size > 1 shards) an HF model "
                          "object: pass the model, not only checkpoint=")
    if config.tp_size == 1:
        if config.injection_policy is not None:
            _policy_errors(plan, model, SINGLE, config.injection_policy)
        return model.to(device=default_device(config), dtype=config.torch_dtype).eval()
    if not launched_spmd():
        raise ConfigError(f"AutoTP with tp_size={config.tp_size} shards the HF modules in place in each rank's "
                          f"process, and this process is not one of {config.tp_size} launched ranks: run the "
                          f"script with `rayspeed --num_gpus {config.tp_size} script.py` (or use "
                          "replace_with_kernel_inject=True for a TP group of Ray actors from this driver)")
    tp, device = _join_launched_group(config)
    _policy_errors(shard_in_place, model, tp, config.injection_policy)
    _adopt_rank0_rng(tp, device)
    return model.to(device=device, dtype=config.torch_dtype).eval()


def _policy_errors(action, model, tp: TensorParallel, policy):
    try:
        return action(model, tp, policy)
    except AutoTPError as error:
        raise ConfigError(str(error)) from None


def _adopt_rank0_rng(tp: TensorParallel, device: torch.device) -> None:
    torch.set_rng_state(tp.broadcast_object(torch.get_rng_state() if tp.rank == 0 else None))
    if device.type == "cuda":
        torch.cuda.set_rng_state(tp.broadcast_object(torch.cuda.get_rng_state(device) if tp.rank == 0 else None),
                                 device)


def on_ray(model, config: InferenceConfig, tokenizer=None) -> Model:
    """An InferenceGroup; a model object is first written as a checkpoint the workers read slices of."""
    import ray

    from cluster.group import InferenceGroup
    from cluster.group_backend import GroupBackend, _get

    if is_description(config.checkpoint):             # checked before anything starts
        config = config.model_copy(update={"checkpoint": described(model, config)})
    if not ray.is_initialized():
        ray.init()                                  # joins a running cluster, else starts a local one
    if not isinstance(config.checkpoint, (str, dict)):
        if model is None:
            raise ConfigError("init_inference needs a model object or checkpoint='dir-or-fsspec-URI'")
        staging = tempfile.mkdtemp(prefix="rayspeed-ckpt-")
        atexit.register(shutil.rmtree, staging, ignore_errors=True)
        save_checkpoint(model, staging, tokenizer)
        config = config.model_copy(update={"checkpoint": staging})
    group = InferenceGroup.remote(config)               # raises PlacementError when it cannot fit
    backend = GroupBackend(group)
    try:
        info = _get(group.model_info.remote())
    except BaseException:
        backend.shutdown()
        raise
    return Model(backend, info["hf_config"], info["generation_config"], tokenizer or info["tokenizer"])
