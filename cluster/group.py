"""`InferenceGroup`: one tensor-parallel group as a plain Ray actor.

`InferenceGroup.remote(config)` (or `.options(name=...).remote(config)`) reserves the placement
group first, failing within `config.placement_timeout_s` with the resources asked for and
available, then starts the group actor in bundle 0, where it hosts rank 0 (`TPGroup`) and starts
the other ranks in the other bundles. The handle it returns is an ordinary actor handle:
`ray.get(group.generate.remote(["DeepSpeed is"], max_new_tokens=50))`.
"""
import asyncio

import ray

from actors.outputs import RequestOutput, add_text
from actors.sequence import SamplingParams
from actors.descriptions import is_description, resolve_description
from actors.sharded_checkpoint import open_any
from cluster.config import ConfigError, InferenceConfig
from cluster.generation import encode_prompts, token_list
from cluster.placement import in_bundle, rank_bundles, release, reserve
from cluster.tp_group import GroupError, TPGroup
from policies.registry import policy_for  # noqa: F401  (GroupError is part of this door)


class GroupActor:
    """The actor behind an `InferenceGroup` handle; lives in bundle 0 of its placement group."""

    def __init__(self, config: InferenceConfig, pg):
        self.config, self.pg = config, pg
        self.group = TPGroup(config, pg)
        ckpt = open_any(config.checkpoint, config.storage_options, 0, config.tp_size)
        self.hf_config, self.generation_config = ckpt.hf_config(), ckpt.generation_config()
        self.tokenizer = ckpt.tokenizer()
        self._started: asyncio.Future | None = None

    async def start(self) -> dict:
        """Rendezvous and load on every rank (once); returns the load report."""
        if self._started is None:
            self._started = asyncio.ensure_future(self.group.start(self.config.checkpoint))
        return await asyncio.shield(self._started)

    async def generate(self, prompts, **sampling) -> list[RequestOutput]:
        """Prompts as strings (with a checkpoint tokenizer) or token-id lists; sampling as SamplingParams."""
        await self.start()
        ids, texts = encode_prompts(prompts, self.tokenizer)
        sampling.setdefault("stop_token_ids", tuple(token_list(self.generation_config.eos_token_id)))
        results = await self.group.loop.generate(ids, SamplingParams.build(**sampling))
        return add_text(results, self.tokenizer, texts)

    async def generate_ids(self, prompts: list[list[int]], params: SamplingParams,
                           position_offsets: list[int] | None = None) -> list[RequestOutput]:
        await self.start()
        return await self.group.loop.generate(prompts, params, position_offsets)

    async def forward_logits(self, prompts: list[list[int]], position_offsets: list[int]):
        await self.start()
        logits = await self.group.loop.call(lambda engine: engine.forward_logits(prompts, position_offsets))
        return [t.cpu() for t in logits]

    async def health(self) -> dict:
        """Rank 0's engine-loop state; raises `GroupError` once a rank has failed."""
        await self.start()
        return self.group.health()

    async def model_info(self) -> dict:
        await self.start()
        return {"hf_config": self.hf_config, "generation_config": self.generation_config,
                "tokenizer": self.tokenizer, "report": self.group.report}

    def placement_group(self):
        return self.pg

    async def shutdown(self) -> None:
        """Stop every rank and give the placement group back (which ends this actor too, just
        after this call has answered)."""
        await self.group.shutdown()
        asyncio.get_running_loop().call_later(0.2, release, self.pg)

    def __ray_shutdown__(self) -> None:
        """Ray ends this actor gracefully once its last handle is gone, maybe within the 0.2 s after
        `shutdown` answered (a caller that drops the handle right away): the placement group goes
        back here too. (A running group whose handle is dropped without `shutdown` is not ended
        gracefully by Ray 2.60: call `shutdown`.)"""
        release(self.pg)


class _InferenceGroupClass:
    """Looks like a Ray actor class: `.remote(config)` and `.options(**actor_options).remote(config)`."""

    def __init__(self, actor_options: dict | None = None):
        self.actor_options = actor_options or {}

    def options(self, **actor_options) -> "_InferenceGroupClass":
        return _InferenceGroupClass({**self.actor_options, **actor_options})

    def remote(self, config: InferenceConfig):
        if not isinstance(config.checkpoint, (str, dict)):
            raise ConfigError("InferenceGroup needs config.checkpoint: a directory or fsspec URI of an HF model, "
                              "or a checkpoint description")
        if is_description(config.checkpoint):               # resolved once, here: every rank gets the same
            config = config.model_copy(update={"checkpoint": resolve_description(
                config.checkpoint, config.base_dir, config.storage_options, None, config.tp_size)})
        hf_config = open_any(config.checkpoint, config.storage_options, 0, config.tp_size).hf_config()
        try:
            policy_for(hf_config).spec(hf_config).check_tp(config.tp_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        pg = reserve(rank_bundles(config.tp_size, config.worker_cpus), config.placement_strategy,
                     config.placement_timeout_s)
        gpus = pg.bundle_specs[0].get("GPU", 0)
        try:
            actor = ray.remote(GroupActor).options(num_cpus=config.worker_cpus, num_gpus=gpus,
                                                   scheduling_strategy=in_bundle(pg, 0), **self.actor_options)
            return actor.remote(config, pg)
        except BaseException:
            release(pg)
            raise


InferenceGroup = _InferenceGroupClass()
