"""The driver's view of an `InferenceGroup`: the backend behind `engine.module` and `engine.generate`
when the model runs on a TP group of Ray actors."""
import ray
import torch

from actors.outputs import RequestOutput
from actors.sequence import SamplingParams
from cluster.placement import release


class GroupBackend:
    device = torch.device("cpu")           # results come back to the driver's memory

    def __init__(self, group):
        self.group = group

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 position_offsets: list[int] | None = None) -> list[RequestOutput]:
        return _get(self.group.generate_ids.remote(prompts, params, position_offsets))

    def forward_logits(self, prompts: list[list[int]], position_offsets: list[int]) -> list[torch.Tensor]:
        return _get(self.group.forward_logits.remote(prompts, position_offsets))

    def health(self) -> dict:
        return _get(self.group.health.remote())

    def shutdown(self) -> None:
        """Stops the ranks and releases the placement group (the group actor ends with it)."""
        pg = None
        try:
            pg = ray.get(self.group.placement_group.remote(), timeout=60)
            ray.get(self.group.shutdown.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            pass                                        # already gone
        release(pg)                                     # from here too: the actor may be gone before it can


def _get(ref):
    """ray.get, re-raising a remote error as its own type (RequestError, GroupError, ...)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        raise e.as_instanceof_cause() from None
