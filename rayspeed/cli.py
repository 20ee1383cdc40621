"""`rayspeed --num_gpus N script.py [args...]`: DeepSpeed's launcher on a Ray cluster (see
`cluster.launcher`). Attaches to a running cluster (`--address`, or one found with `address="auto"`)
or starts a local one."""
import argparse
import logging
import math
import os
import signal
import sys

import ray

from cluster.launcher import LaunchSpec, launch
from cluster.placement import PlacementError

_STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayspeed", description="Run a script on N ranks of a Ray cluster, "
                                     "with torch.distributed's env:// variables set (DeepSpeed's launcher on Ray).")
    parser.add_argument("--num_gpus", type=int, default=1,
                        help="ranks per node, one GPU each when the cluster has GPUs (as DeepSpeed's launcher)")
    parser.add_argument("--num_nodes", type=int, default=None,
                        help="nodes to spread over: num_nodes x num_gpus ranks in all")
    parser.add_argument("--cpus_per_rank", type=float, default=1.0, help="CPUs reserved for each rank")
    parser.add_argument("--placement_strategy", choices=_STRATEGIES, default=None,
                        help="placement-group strategy (default PACK, SPREAD with --num_nodes > 1)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the resources")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: a running one, else local)")
    parser.add_argument("--no_local_rank", action="store_true", help="do not pass --local_rank=<n> to the script")
    parser.add_argument("--hostfile", default=None, help="accepted for DeepSpeed compatibility; Ray chooses the nodes")
    parser.add_argument("script", help="the Python script every rank runs")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return parser


def _spec(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LaunchSpec:
    if args.num_gpus < 1:
        parser.error(f"--num_gpus must be at least 1, got {args.num_gpus}")
    if args.num_nodes is not None and args.num_nodes < 1:
        parser.error(f"--num_nodes must be at least 1, got {args.num_nodes}")
    spread = args.num_nodes is not None and args.num_nodes > 1
    strategy = args.placement_strategy or ("SPREAD" if spread else "PACK")
    num_ranks = args.num_gpus * (args.num_nodes or 1)
    return LaunchSpec(script=args.script, script_args=tuple(args.script_args), num_ranks=num_ranks,
                      num_nodes=args.num_nodes, cpus_per_rank=args.cpus_per_rank, strategy=strategy,
                      timeout_s=args.timeout, local_rank_arg=not args.no_local_rank)


def connect(address: str | None, spec: LaunchSpec) -> None:
    """Attaches to the cluster at `address`, else to a running one, else starts a local one with
    enough logical CPUs for every rank (as `deepspeed` would start them all on this machine)."""
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **quiet)
        return
    try:
        ray.init(address="auto", **quiet)
    except ConnectionError:
        num_cpus = max(os.cpu_count() or 1, math.ceil(spec.num_ranks * spec.cpus_per_rank))
        ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # the launcher's clean-up path: stop every rank, remove the placement group


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rayspeed` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    spec = _spec(args, parser)
    if args.hostfile:
        print(f"rayspeed: ignoring --hostfile {args.hostfile}: Ray places the ranks", file=sys.stderr)
    connect(args.address, spec)
    signal.signal(signal.SIGTERM, _on_sigterm)  # after ray.init, which installs its own handler
    try:
        return launch(spec)
    except PlacementError as error:
        print(f"rayspeed: {error}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
