"""Placement groups for a TP group or a launch: one bundle per rank, GPU bundles where the cluster has GPUs."""
import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class PlacementError(RuntimeError):
    """The cluster cannot (or did not in time) provide the resources asked for; the message names
    what was asked for and what the cluster has."""


def rank_bundles(num_ranks: int, cpus: float, use_gpus: bool | None = None) -> list[dict]:
    """One bundle per rank: {"CPU": cpus, "GPU": 1} when the cluster has GPUs, else {"CPU": cpus}."""
    if use_gpus is None:
        use_gpus = ray.cluster_resources().get("GPU", 0) > 0
    bundle = {"CPU": cpus, "GPU": 1} if use_gpus else {"CPU": cpus}
    return [{k: v for k, v in bundle.items() if v} or {"CPU": 0.01} for _ in range(num_ranks)]


def reserve(bundles: list[dict], strategy: str, timeout_s: float) -> PlacementGroup:
    """A placement group, ready within `timeout_s`, else removed again and `PlacementError`. Blocks."""
    pg = placement_group(bundles, strategy=strategy)
    if not pg.wait(timeout_seconds=timeout_s):
        remove_placement_group(pg)
        raise PlacementError(
            f"asked for {len(bundles)} x {bundles[0]} ({strategy}); not available after {timeout_s:g}s. "
            f"The cluster has {_fmt(ray.cluster_resources())} in all, {_fmt(ray.available_resources())} free")
    return pg


def _fmt(resources: dict) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("GPU", "CPU"))


def in_bundle(pg: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index,
                                            placement_group_capture_child_tasks=True)


def release(pg: PlacementGroup | None) -> None:
    if pg is not None:
        try:
            remove_placement_group(pg)
        except Exception:               # already removed, or gone with the cluster
            pass
