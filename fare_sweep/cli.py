"""``fare sweep GRID.yaml --out DIR [--executor local|ray]`` and ``fare sweep status DIR``."""

from __future__ import annotations

import argparse
import sys

from fare_core.errors import FareError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fare sweep", description="Run a compression/intervention grid as resumable cells "
        "(compress -> lm-eval -> leaderboard). `fare sweep status DIR` reports the cells of a sweep.")
    ap.add_argument("grid", help="grid YAML (see examples/sweep_tiny.yaml)")
    ap.add_argument("--out", required=True, help="sweep folder (new, or a previous sweep's folder to resume)")
    ap.add_argument("--executor", default="local", choices=("local", "ray"),
                    help="local: cells in this process, one after another; ray: cells as Ray tasks")
    ap.add_argument("--ray-address", default=None,
                    help="existing Ray cluster (auto, or ray://HEAD:10001); default: start a local cluster")
    ap.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    ap.add_argument("--max-retries", type=int, default=2, help="Ray: retries of a cell whose worker died (default 2)")
    ap.add_argument("--cache", default=None, help="compressed-checkpoint cache folder (default DIR/checkpoints); "
                    "share it between sweeps to reuse checkpoints across task sets")
    ap.add_argument("--no-leaderboard", action="store_true", help="skip the leaderboard after the grid")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fare sweep``; FareErrors become one line in ``fare_models.cli.main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "status":
        return status_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.max_retries < 0:
        raise FareError(f"--max-retries {args.max_retries}: must be >= 0")
    if args.ray_num_cpus is not None and args.ray_num_cpus < 1:
        raise FareError(f"--ray-num-cpus {args.ray_num_cpus}: must be >= 1")
    for flag, value in (("--ray-address", args.ray_address), ("--ray-num-cpus", args.ray_num_cpus)):
        if value is not None and args.executor != "ray":
            raise FareError(f"{flag} {value!r} needs --executor ray")
    if args.ray_address and args.ray_num_cpus is not None:
        raise FareError(f"--ray-num-cpus {args.ray_num_cpus} sizes a local cluster; an existing one "
                        f"(--ray-address {args.ray_address!r}) has its own CPUs: drop one of them")
    from .run import run_sweep

    return run_sweep(args.grid, args.out, executor=args.executor, ray_address=args.ray_address,
                     cache=args.cache, ray_num_cpus=args.ray_num_cpus, max_retries=args.max_retries,
                     leaderboard=not args.no_leaderboard)


def status_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fare sweep status", description="done/running/failed/pending per cell")
    ap.add_argument("out", help="the --out folder of `fare sweep`")
    args = ap.parse_args(argv)
    from .status import cell_states, format_status

    print(format_status(cell_states(args.out)))
    return 0
