"""``fare`` console script: ``fare eval ...`` runs lm-eval with fare-moe's registrations.

Other subcommands are registered lazily in :data:`SUBCOMMANDS` as ``"module:function"``; the
function receives the remaining argv list and returns an exit code. :func:`main` turns a
:class:`~fare_core.errors.FareError` (anywhere in the exception chain) into one line and exit 2, and
Ctrl-C into "interrupted; rerun the same command to resume" and exit 130 (``FARE_DEBUG=1``: traceback).
"""

from __future__ import annotations

import importlib
import sys

from fare_core.errors import report

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("fare_models.cli:run_eval", "run lm-eval (same flags as `lm_eval`) with fare-moe's model and tasks"),
    "compare": ("fare_analysis.compare:main", "paired tests of every metric between two lm-eval runs (--log_samples)"),
    "drift": ("fare_analysis.drift:main", "prompt-matched drift of runs from a baseline (flips, text divergence)"),
    "leaderboard": ("fare_analysis.leaderboard:main", "many runs vs their baselines: Δ with CIs, drift, instability, HTML"),
    "compress": ("fare_compression.cli:main", "compress an MoE model and save a checkpoint"),
    "prompts": ("fare_pipeline.cli:prompts", "write the demographic prompt set"),
    "profile": ("fare_pipeline.cli:profile", "routing profiling -> phi profile file"),
    "layers": ("fare_pipeline.cli:layers", "AALS layer selection"),
    "tune": ("fare_pipeline.cli:tune", "lambda* under a perplexity budget"),
    "ablate": ("fare_pipeline.cli:ablate", "profile controls, baselines and group masking"),
    "transfer": ("fare_pipeline.cli:transfer", "generation transfer with paired tests"),
    "run": ("fare_pipeline.cli:run", "the whole FARE pipeline into one report folder"),
    "robustness": ("fare_pipeline.robustness:robustness", "section 5.5 robustness checks with paired tests"),
    "sweep": ("fare_sweep.cli:main", "a resumable compression grid, local or on Ray (`fare sweep status DIR`)"),
}


def run_eval(argv: list[str]) -> int:
    """Delegate to lm-eval's own CLI after making sure our model and tasks are registered."""
    from fare_models import discovery

    discovery.register_all()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


def _usage() -> str:
    lines = ["usage: fare <command> [args...]", "", "commands:"]
    width = max(map(len, SUBCOMMANDS)) + 1
    lines += [f"  {name:<{width}} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"fare: unknown command {name!r}; allowed: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    try:
        return _run(name, rest)
    except BaseException as e:  # one place for every subcommand: FareError and Ctrl-C as one line
        code = report(e, f"fare {name}")
        if code is None:
            raise
        return code


def _run(name: str, rest: list[str]) -> int:
    module_name, _, func_name = SUBCOMMANDS[name][0].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"fare {name}: not available in this installation ({module_name} missing)", file=sys.stderr)
            return 2
        raise
    result = getattr(module, func_name)(rest)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
