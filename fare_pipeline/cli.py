"""``fare`` pipeline subcommands (dispatched by ``fare_models.cli``): each takes argv, returns an exit code."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("fare-moe", "torch", "transformers", "lm_eval", "numpy", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _fail(cmd: str, err: Exception) -> int:
    print(f"fare {cmd}: {err}", file=sys.stderr)
    return 2


def _contexts(value: str):
    if value == "all":
        return "all"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: allowed: an integer or 'all'") from None


def prompts(argv: list[str]) -> int:
    """``fare prompts --out DIR``: write the seeded demographic prompt set (SPEC section 1)."""
    from .prompts import AXES, DEFAULT_CONTEXTS_PER_DESCRIPTOR, DEFAULT_VALIDATION_FRACTION, build_prompt_set

    ap = argparse.ArgumentParser(prog="fare prompts", description=prompts.__doc__)
    ap.add_argument("--out", required=True, type=Path, help="output folder (prompts.jsonl + prompts_manifest.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--axes", default=None, help=f"comma-separated subset of: {', '.join(AXES)}")
    ap.add_argument("--contexts-per-descriptor", type=_contexts, default=DEFAULT_CONTEXTS_PER_DESCRIPTOR,
                    help="contexts each descriptor is inserted into (int or 'all'); default 80 -> 3,280 prompts")
    ap.add_argument("--validation-fraction", type=float, default=DEFAULT_VALIDATION_FRACTION)
    args = ap.parse_args(argv)
    try:
        ps = build_prompt_set(
            seed=args.seed,
            axes=[a.strip() for a in args.axes.split(",") if a.strip()] if args.axes is not None else None,
            contexts_per_descriptor=args.contexts_per_descriptor,
            validation_fraction=args.validation_fraction,
        )
    except ValueError as e:
        return _fail("prompts", e)
    ps.meta["versions"] = _versions()
    path = ps.write(args.out)
    m = ps.meta
    print(f"wrote {m['n_neutral']} neutral + {m['n_demographic']} demographic prompts "
          f"({m['n_by_split']['validation']} validation / {m['n_by_split']['test']} test) to {path}")
    return 0


def _not_yet(name: str):
    def run(argv: list[str]) -> int:
        print(f"fare {name}: not implemented yet in this installation", file=sys.stderr)
        return 2

    run.__name__ = name
    return run


profile = _not_yet("profile")
layers = _not_yet("layers")
tune = _not_yet("tune")
ablate = _not_yet("ablate")
transfer = _not_yet("transfer")
run = _not_yet("run")

__all__ = ["prompts", "profile", "layers", "tune", "ablate", "transfer", "run"]
