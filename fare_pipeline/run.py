"""``fare layers | tune | ablate | transfer | run``: argument parsing and the one-command pipeline.

``fare run --model M --out DIR``: prompts -> profile -> layers -> tune -> evaluate -> ablate ->
transfer -> report, each stage a folder of DIR (resumable, see :mod:`fare_pipeline.stages`).
``DIR/report`` holds every table of the paper's sections 5.1-5.5 as CSV + Markdown, the plots and
``manifest.json`` (model id, revision, seeds, splits, sizes, versions, stage keys);
``DIR/timings.json`` holds wall times (kept out of the number files) and ``DIR/work.json`` the
decoder-layer work per stage (:class:`fare_pipeline.work.LayerWork`; a resumed stage did none).

Tables 3, 6, 7 and 8 use one lambda, lambda* (0 included; the control lambda only when lambda* is
infeasible, see :func:`fare_pipeline.stages.intervention_lambda`), stated in every title and in the
opening lines of ``report.md`` (:func:`report_header`). ``--out`` is checked before anything loads.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .aals import DEFAULT_LAMBDA_GRID, DEFAULT_QUANTILE
from .stages import (
    Ctx,
    Sizes,
    file_sha,
    key_hash,
    load_phi,
    prompts_sha,
    stage,
    write_json,
)


def versions() -> dict:
    """Python and package versions recorded in every manifest."""
    import platform

    from fare_core.files import package_versions

    return {"python": platform.python_version(),
            **package_versions(("fare-moe", "torch", "transformers", "lm_eval", "numpy", "scipy"))}

REPORT_TABLES = {
    "5.1": ["table5_1_routing_sensitivity"],  # fsp_layers.csv (raw digits) is in the folder too
    "5.2": ["table2_group_masking", "table3_architecture", "table4_synthetic_ablation", "table5_cross_architecture"],
    "5.3": ["table6_main", "tests", "aals", "probes", "lambda_grid"],
    "5.4": ["table7_generation_transfer"],
    "5.5": ["table8_expert_identification", "table8_tests"],
}


def _lambda_grid(value: str) -> list[float]:
    """``--grid``: distinct finite lambdas >= 0 (the rule of :func:`fare_pipeline.aals.select_lambda`)."""
    try:
        out = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
    if not out:
        raise argparse.ArgumentTypeError(f"{value!r}: expected at least one number")
    if len(set(out)) != len(out) or not all(math.isfinite(x) and x >= 0 for x in out):
        raise argparse.ArgumentTypeError(f"{value!r}: allowed: distinct comma-separated numbers >= 0, e.g. 0,0.5,1")
    return out


def _number(value: str, ok, allowed: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and ok(x)):
        raise argparse.ArgumentTypeError(f"{value!r}: allowed: {allowed}")
    return x


def quantile_arg(value: str) -> float:
    """``--quantile`` of AALS (Eq. 5): a number in [0, 1]."""
    return _number(value, lambda x: 0 <= x <= 1, "a number in [0, 1]")


def budget_arg(value: str) -> float:
    """``--beta`` (Eq. 7's perplexity budget) and ``--lambda-max``: a finite number >= 0."""
    return _number(value, lambda x: x >= 0, "a finite number >= 0")


def _positive_int(value: str, allowed: str = "an integer >= 1") -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: allowed: {allowed}")
    return n


def _ints(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected comma-separated layer indices, e.g. 2,5") from None


def _opt_int(value: str):
    """A positive integer, or None (the whole split) for 'all' / 'none'."""
    return None if value in ("all", "none") else _positive_int(value, "a positive integer or 'all'")


def contexts(value: str):
    """``--contexts-per-descriptor``: a positive integer or 'all'."""
    return "all" if value == "all" else _positive_int(value, "a positive integer or 'all'")


SIZE_FLAGS = {  # flag -> (Sizes field, type, what it sizes)
    "--contexts-per-descriptor": ("contexts_per_descriptor", contexts,
                                  "contexts each of the 41 descriptors is inserted into when the prompt set is built "
                                  "(an integer or 'all')"),
    "--crows-val": ("crows_val", _opt_int, "CrowS-Pairs pairs of the validation split scored by AALS and the lambda grid"),
    "--ppl-val": ("ppl_val", _opt_int, "held-out perplexity texts of the validation split"),
    "--crows-test": ("crows_test", _opt_int, "CrowS-Pairs pairs of the test split (Tables 2-6 and 8)"),
    "--ppl-test": ("ppl_test", _opt_int, "held-out perplexity texts of the test split"),
    "--tqa": ("tqa", _opt_int, "TruthfulQA MC1 questions (test split)"),
    "--bold": ("bold", int, "BOLD prompts of the generation transfer (Table 7)"),
    "--stereo-completion": ("stereo_completion", _opt_int, "stereotype-completion prompts of the generation transfer"),
    "--stereoset": ("stereoset", int, "StereoSet contexts of the generation transfer"),
    "--max-new-tokens": ("max_new_tokens", _positive_int, "greedy tokens generated per prompt (Table 7)"),
    "--permutations": ("n_permutations", _positive_int, "permutations of every paired permutation test"),
    "--bootstrap": ("n_bootstrap", _positive_int, "bootstrap resamples of every 95%% CI"),
    "--mask-n": ("mask_n", _positive_int, "experts masked together over the selected layers (Table 2: top, bottom, random by phi)"),
    "--baseline-n": ("baseline_n", _positive_int, "experts per selected layer of the SES and random-expert baselines (Table 8)"),
}
_PROMPTS, _VAL = ("contexts_per_descriptor",), ("crows_val", "ppl_val")
_TEST, _TESTS = ("crows_test", "ppl_test", "tqa"), ("n_permutations", "n_bootstrap")
_GEN = ("bold", "stereo_completion", "stereoset", "max_new_tokens")
STAGE_SIZES = {  # the Sizes fields each command uses (and lists in its --help)
    "layers": _PROMPTS + _VAL, "tune": _PROMPTS + _VAL,
    "ablate": _PROMPTS + _TEST + _TESTS + ("mask_n", "baseline_n"),
    "transfer": _GEN + _TESTS,
    "robustness": _PROMPTS + _VAL + _TEST + _TESTS,
    "run": tuple(name for name, _, _ in SIZE_FLAGS.values()),
}


def _show(value) -> str:
    return "all" if value is None else str(value)


def add_common_flags(ap: argparse.ArgumentParser, out_required: bool = True, sizes: tuple = STAGE_SIZES["run"],
                     scoring: bool = True, random_seeds: bool = True) -> None:
    """Flags every pipeline command shares, the size flags of ``sizes``, (``scoring``) the log-likelihood
    scoring flags and (``random_seeds``) ``--random-seeds``."""
    full, quick = Sizes(), Sizes.quick()
    ap.add_argument("--model", required=True, help="hub id, local path, fare-tiny or fare-tiny:<model_type>")
    ap.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --model; recorded")
    ap.add_argument("--out", required=out_required, type=Path,
                    help="output folder: new, empty, or this command's earlier output (finished stages whose inputs "
                         "did not change are skipped)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every split, subset and control (recorded; default 0)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="dtype the model is loaded in (default: auto = the checkpoint's)")
    quick_sizes = ", ".join(f"{_flag(n)} {_show(getattr(quick, n))}" for n in sizes)
    ap.add_argument("--quick", action="store_true", help=f"CI-sized data ({quick_sizes}); explicit size flags win")
    for flag, (name, typ, what) in SIZE_FLAGS.items():
        if name in sizes:
            ap.add_argument(flag, dest=name, type=typ, default=None, metavar="N",
                            help=f"{what} (default: {_show(getattr(full, name))}; --quick: {_show(getattr(quick, name))})")
    if scoring:
        ap.add_argument("--validation-fraction", type=float, default=0.5,
                        help="share of prompt contexts and CrowS-Pairs pairs in the validation split (AALS, lambda*); "
                             "the rest is the test split (default 0.5)")
        ap.add_argument("--ppl-source", default="prompts", choices=["prompts", "harmless"],
                        help="held-out perplexity texts: the prompt set's own validation/test prompts, or the "
                             "fare_perplexity task's texts (default: prompts)")
        ap.add_argument("--engine", default="cached", choices=["cached", "naive"],
                        help="cached = prefix trees + kept base pass (exact); naive = full forward per configuration")
        ap.add_argument("--batch-tokens", type=int, default=8192,
                        help="token positions per scoring batch (default 8192; lower it when memory is short)")
        ap.add_argument("--no-keep-base", action="store_true",
                        help="re-run the unmodified base pass in every stage instead of keeping it (less memory)")
    if random_seeds:
        ap.add_argument("--random-seeds", type=_positive_int, default=5,
                        help="seeds averaged for the random controls, baselines and masks (default 5)")
    ap.add_argument("--arr-target", default="logits", choices=["logits", "selection"],
                    help="ARR on the router logits (Eq. 6, default) or on the selection score (routers that add a "
                         "correction bias after the score function: ERNIE-4.5, DeepSeek-V3)")
    add_progress_flags(ap)
    ap.add_argument("--no-resume", action="store_true", help="recompute stages even when their outputs match")


def add_progress_flags(ap: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` / ``--progress-interval`` (read by :func:`progress_mode`)."""
    ap.add_argument("--progress", action="store_true", help="progress bars (default: when stderr is a terminal)")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bars; progress lines every --progress-interval seconds instead (the default "
                         "when stderr is not a terminal)")
    ap.add_argument("--progress-interval", type=float, default=30.0, metavar="SECONDS",
                    help="seconds between progress lines when there are no progress bars (default 30; 0 = none)")


def progress_mode(args) -> tuple[bool, float | None]:
    """(progress bars?, seconds between progress lines or None)."""
    bars = bool(args.progress or (sys.stderr.isatty() and not args.no_progress))
    return bars, (None if bars or args.progress_interval <= 0 else args.progress_interval)


def _flag(name: str) -> str:
    return next(f for f, (n, _, _) in SIZE_FLAGS.items() if n == name)


def _sizes(args) -> Sizes:
    s = Sizes.quick() if args.quick else Sizes()
    for name, _, _ in SIZE_FLAGS.values():
        v = getattr(args, name, None)
        if v is not None:
            setattr(s, name, v)
    return s


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_ctx(args) -> Ctx:
    """Load ``--model`` (progress lines while it loads) and the run settings of the flags of :func:`add_common_flags`."""
    from fare_models.surgery import RoutingController

    from .profiling import load_model
    from .work import Heartbeat

    bars, heartbeat = progress_mode(args)
    t0 = time.perf_counter()
    _log(f"loading model {args.model} ...")
    with Heartbeat("load_model", _log, heartbeat or 0.0):  # a large checkpoint takes minutes
        model, tok, model_id = load_model(args.model, revision=args.revision, device=args.device, dtype=args.dtype,
                                          progress=bars)
    _log(f"loaded {model_id} in {time.perf_counter() - t0:.1f} s")
    return Ctx(model=model, tokenizer=tok, model_id=model_id, model_type=RoutingController.of(model).model_type,
               revision=args.revision, seed=args.seed, sizes=_sizes(args),
               validation_fraction=getattr(args, "validation_fraction", 0.5),
               ppl_source=getattr(args, "ppl_source", "prompts"), engine_mode=getattr(args, "engine", "cached"),
               batch_tokens=getattr(args, "batch_tokens", 8192), keep_base=not getattr(args, "no_keep_base", False),
               arr_target=args.arr_target, progress=bars, log=_log, heartbeat=heartbeat)


def _prompt_set(args):
    """The prompt set of a command (read from --prompts, or built from the seed and sizes); no model needed."""
    from .prompts import PromptSet, build_prompt_set

    if getattr(args, "prompts", None):
        return PromptSet.read(args.prompts)
    axes = [a.strip() for a in args.axes.split(",") if a.strip()] if getattr(args, "axes", None) else None
    return build_prompt_set(seed=args.seed, axes=axes, contexts_per_descriptor=_sizes(args).contexts_per_descriptor,
                            validation_fraction=getattr(args, "validation_fraction", 0.5))


FSP_HELP = {
    "usage": "P(e|g) from top-k selection counts or from summed routing probabilities",
    "ard_aggregate": "ARD (Eq. 1) over the demographic groups: mean, max or token-weighted mean",
    "pmi_form": "PMI (Eq. 3): standard log2(P(e|g)/P(e)), or printed log2(P(e|g)/(P(e)P(g))) as the paper prints it",
    "pmi_baseline": "P(e) of the PMI: pooled over all prompts, or neutral prompts only",
    "pmi_aggregate": "PMI over groups: max, mean, or max_abs (the signed value of largest magnitude)",
    "jsd_demographic": "demographic distribution of the JSD (Eq. 2): pooled counts, or the mean of per-group distributions",
    "normalization": "normalisation of each metric before Eq. 4: per layer (minmax, the paper), across every layer x "
                     "expert slot (minmax_global), or none",
    "frequency_source": "prompts whose selections define the routing frequency f of the descriptors",
    "top_share_of": "basis of the top-k share descriptor (Table 3): phi, or the routing frequency f",
}


def add_fsp_options(ap: argparse.ArgumentParser) -> None:
    """The FSP options (Eqs. 1-4) as flags: metric weights, PMI form and baseline, top-share basis, ..."""
    from .fsp import _CHOICES, DEFAULT_WEIGHTS, FSPOptions

    default_w = ",".join(f"{k}={v:g}" for k, v in DEFAULT_WEIGHTS.items())
    ap.add_argument("--weights", type=_weights, default=None, metavar="ard=W,jsd=W,pmi=W,ent=W",
                    help=f"FSP metric weights of Eq. 4 (default {default_w}; unnamed metrics get weight 0)")
    for name, allowed in _CHOICES.items():
        ap.add_argument("--" + name.replace("_", "-"), default=getattr(FSPOptions, name), choices=allowed,
                        help=f"{FSP_HELP[name]} (default: {getattr(FSPOptions, name)})")
    ap.add_argument("--pmi-smoothing", type=float, default=FSPOptions.pmi_smoothing,
                    help=f"additive constant on the PMI's numerator and denominator (default {FSPOptions.pmi_smoothing:g})")
    ap.add_argument("--top-share-k", type=int, default=FSPOptions.top_share_k,
                    help=f"k of the top-k share descriptor (default {FSPOptions.top_share_k})")


def fsp_options(args):
    """FSPOptions from the flags of :func:`add_fsp_options` (one-line error for a bad combination)."""
    from .fsp import _CHOICES, DEFAULT_WEIGHTS, FSPOptions

    weights = dict(DEFAULT_WEIGHTS) if args.weights is None else dict(args.weights)  # unknown names: FSPOptions refuses
    return FSPOptions(weights=weights, pmi_smoothing=args.pmi_smoothing, top_share_k=args.top_share_k,
                      **{name: getattr(args, name) for name in _CHOICES})


def _weights(value: str) -> dict:
    out = {}
    for part in value.split(","):
        key, sep, num = part.partition("=")
        try:
            out[key.strip()] = float(num)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected name=number, e.g. ard=1,jsd=0.5,pmi=0.3,ent=0") from None
        if not sep:
            raise argparse.ArgumentTypeError(f"{part!r}: expected name=number")
    return out


def _read_json(path: Path, name: str) -> dict:
    from fare_core.errors import FareError

    p = Path(path)
    if p.is_dir():
        p = p / name
    if not p.is_file():
        raise FareError(f"{str(p)!r} does not exist (expected {name} from an earlier stage)")
    return json.loads(p.read_text())


def _selected(args) -> list[int]:
    from fare_core.errors import FareError

    if getattr(args, "select", None):
        return args.select
    if not getattr(args, "layers", None):
        raise FareError("pass --layers DIR (output of fare layers) or --select L1,L2")
    return list(_read_json(args.layers, "aals.json")["selected"])


def _lambda_star(args):
    from fare_core.errors import FareError

    if getattr(args, "lam", None) is not None:
        return args.lam
    if not getattr(args, "tune", None):
        raise FareError("pass --tune DIR (output of fare tune) or --lam X")
    return _read_json(args.tune, "lambda_star.json")["lambda_star"]


def fail(cmd: str, err: Exception) -> int:
    """Print ``fare CMD: <message>`` as one line on stderr; exit code 2 (every pipeline command's bad input)."""
    from fare_core.errors import one_line

    print(f"fare {cmd}: {one_line(err)}", file=sys.stderr)
    return 2


def _upstream(args) -> dict:
    """Inputs of a single-stage command for its stage key (file contents, not only paths)."""
    out = {k: str(getattr(args, k)) for k in ("select", "lam") if getattr(args, k, None) is not None}
    for k, name in (("profile", None), ("layers", "aals.json"), ("tune", "lambda_star.json"), ("prompts", "prompts.jsonl")):
        p = getattr(args, k, None)
        if p is not None:
            p = Path(p) / name if name and Path(p).is_dir() else Path(p)
            out[k] = file_sha(p) if p.is_file() else str(p)
    return out


# --------------------------------------------------------------------------- single-stage commands


def _stage_parser(prog: str, description: str, sizes: tuple, scoring: bool = True,
                  prompts: bool = True) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    add_common_flags(ap, sizes=sizes, scoring=scoring, random_seeds="mask_n" in sizes)
    ap.add_argument("--profile", required=True, type=Path, help="phi.safetensors written by fare profile")
    ap.add_argument("--profile-check", default="model", choices=["model", "shape"],
                    help="model (default): the profile must be of this model; shape: any checkpoint of the same shape")
    if prompts:
        ap.add_argument("--prompts", type=Path, default=None,
                        help="prompt set folder written by fare prompts (default: built from --seed)")
        ap.add_argument("--axes", default=None, help="comma-separated subset of the nine demographic axes (default: all)")
    return ap


def _layers_from(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--layers", type=Path, default=None, help="output folder of fare layers (its aals.json)")
    ap.add_argument("--select", type=_ints, default=None, metavar="L1,L2",
                    help="decoder-layer indices to steer instead of --layers")


def _lambda_from(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tune", type=Path, default=None, help="output folder of fare tune (its lambda_star.json)")
    ap.add_argument("--lam", type=float, default=None, help="lambda* instead of --tune")


def _single(cmd: str, args, body) -> int:
    """Run a single-stage command: check --out before loading anything, one-line errors."""
    from .stages import check_stage_folder

    try:
        check_stage_folder(args.out)
        return body()
    except (ValueError, FileNotFoundError) as e:
        return fail(cmd, e)


def layers(argv: list[str]) -> int:
    """``fare layers``: AALS (Eq. 5) - per-layer ARR probes at lambda_probe on the validation split."""
    ap = _stage_parser("fare layers", "AALS layer selection: ARR at --lam-probe on one MoE layer at a time on the "
                       "validation split; writes R(l) per layer and the selected layers (aals.json).", STAGE_SIZES["layers"])
    ap.add_argument("--lam-probe", type=float, default=1.0, help="lambda of each single-layer probe (default 1.0)")
    ap.add_argument("--quantile", type=quantile_arg, default=DEFAULT_QUANTILE,
                    help=f"layers whose R(l) exceeds this quantile of R are selected (default {DEFAULT_QUANTILE:g})")
    args = ap.parse_args(argv)
    from .stages import run_layers

    def body():
        ps = _prompt_set(args)
        ctx = load_ctx(args)
        phi, pl = load_phi(ctx, args.profile, args.profile_check == "model")
        key = {**ctx.key(), "stage": "layers", "lam_probe": args.lam_probe, "quantile": args.quantile, **_upstream(args)}
        res = stage(args.out, key, lambda d: run_layers(ctx, phi, pl, ps, d, lam_probe=args.lam_probe,
                                                           quantile=args.quantile), resume=not args.no_resume,
                    log=ctx.log, heartbeat=ctx.heartbeat)
        print(f"AALS selected layers {res['selected']} -> {args.out}")
        return 0

    return _single("layers", args, body)


def tune(argv: list[str]) -> int:
    """``fare tune``: lambda* (Eq. 7) over a grid, CrowS parity target, PPL budget beta."""
    ap = _stage_parser("fare tune", "lambda* over a grid: ARR on the selected layers, the lambda closest to CrowS-Pairs "
                       "parity whose perplexity stays within (1 + beta) x the base perplexity (validation split).",
                       STAGE_SIZES["tune"])
    _layers_from(ap)
    ap.add_argument("--grid", type=_lambda_grid, default=list(DEFAULT_LAMBDA_GRID), metavar="L1,L2,...",
                    help="lambda values to try (default " + ",".join(f"{x:g}" for x in DEFAULT_LAMBDA_GRID)
                         + "; 0 = no intervention; ties go to the smallest lambda)")
    ap.add_argument("--beta", type=budget_arg, default=1.0, help="allowed relative perplexity increase (default 1.0)")
    ap.add_argument("--lambda-max", type=budget_arg, default=None, help="ignore grid values above this (default: none)")
    args = ap.parse_args(argv)
    from .stages import run_tune

    def body():
        sel = _selected(args)
        ps = _prompt_set(args)
        ctx = load_ctx(args)
        phi, pl = load_phi(ctx, args.profile, args.profile_check == "model")
        key = {**ctx.key(), "stage": "tune", "grid": args.grid, "beta": args.beta, "lambda_max": args.lambda_max,
               "selected": sel, **_upstream(args)}
        res = stage(args.out, key, lambda d: run_tune(ctx, phi, pl, sel, ps, d, grid=args.grid, beta=args.beta,
                                                         lambda_max=args.lambda_max), resume=not args.no_resume,
                    log=ctx.log, heartbeat=ctx.heartbeat)
        print(f"lambda* = {res['lambda_star']} ({res['reason']}) -> {args.out}")
        return 0

    return _single("tune", args, body)


def ablate(argv: list[str]) -> int:
    """``fare ablate``: profile controls, expert-identification baselines and group masking (Tables 2-5, 8)."""
    ap = _stage_parser("fare ablate", "Profile controls, expert-identification baselines and group masking on the "
                       "test split (Tables 2, 3, 4, 5 and 8).", STAGE_SIZES["ablate"])
    _layers_from(ap)
    _lambda_from(ap)
    ap.add_argument("--control-lambda", type=float, default=1.0,
                    help="lambda of the Table 4/5 controls (paper: 1.0); Tables 3 and 8 use lambda*, or this when "
                         "lambda* is infeasible")
    args = ap.parse_args(argv)
    from .stages import run_ablate

    def body():
        sel, lam = _selected(args), _lambda_star(args)
        ps = _prompt_set(args)
        ctx = load_ctx(args)
        phi, pl = load_phi(ctx, args.profile, args.profile_check == "model")
        desc = args.profile.parent / "fsp_descriptors.json"
        prof = json.loads(desc.read_text())["descriptors"] if desc.is_file() else None
        key = {**ctx.key(), "stage": "ablate", "selected": sel, "lambda_star": lam, "control_lambda": args.control_lambda,
               "random_seeds": args.random_seeds, **_upstream(args)}
        stage(args.out, key, lambda d: run_ablate(ctx, phi, pl, sel, lam, ps, prof, d, control_lambda=args.control_lambda,
                                                  n_random=args.random_seeds), resume=not args.no_resume, log=ctx.log,
              heartbeat=ctx.heartbeat)
        print(f"wrote ablation tables to {args.out}")
        return 0

    return _single("ablate", args, body)


def transfer(argv: list[str]) -> int:
    """``fare transfer``: baseline vs intervened generations (BOLD, stereotype completion, StereoSet) + paired tests."""
    from .transfer import PROTOCOLS, run_transfer

    ap = _stage_parser("fare transfer", "Generation transfer (Table 7): greedy generations of the base model and of "
                       "ARR at lambda*, scored per prompt, with paired tests.", STAGE_SIZES["transfer"],
                       scoring=False, prompts=False)
    _layers_from(ap)
    _lambda_from(ap)
    ap.add_argument("--control-lambda", type=float, default=1.0,
                    help="lambda used when lambda* is infeasible (default 1.0; stated in the table title)")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS),
                    help="comma-separated subset of " + ", ".join(PROTOCOLS) + " (default: all)")
    args = ap.parse_args(argv)

    def body():
        protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
        bad = [p for p in protocols if p not in PROTOCOLS]
        if bad or not protocols:
            raise ValueError(f"protocols={args.protocols!r}; allowed: a comma-separated subset of {', '.join(PROTOCOLS)}")
        sel, lam = _selected(args), _lambda_star(args)
        ctx = load_ctx(args)
        phi, pl = load_phi(ctx, args.profile, args.profile_check == "model")
        key = {**ctx.key(), "stage": "transfer", "selected": sel, "lambda_star": lam, "protocols": protocols,
               "control_lambda": args.control_lambda, **_upstream(args)}
        stage(args.out, key, lambda d: run_transfer(ctx, phi, pl, sel, lam, d, protocols=protocols,
                                                    control_lambda=args.control_lambda),
              resume=not args.no_resume, log=ctx.log, heartbeat=ctx.heartbeat)
        print(f"wrote generation-transfer tables to {args.out}")
        return 0

    return _single("transfer", args, body)


# --------------------------------------------------------------------------- one command


RUN_STAGES = ("prompts", "profile", "layers", "tune", "evaluate", "ablate", "transfer", "report")


def run(argv: list[str]) -> int:
    """``fare run --model M --out DIR``: the whole FARE pipeline and a report of Tables 2-8 (sections 5.1-5.5)."""
    args = run_parser().parse_args(argv)
    try:
        from .stages import check_run_folder

        check_run_folder(args.out, RUN_STAGES)  # before any compute
        fsp_options(args)  # bad FSP options fail before the model loads
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        return fail("run", e)


def run_parser() -> argparse.ArgumentParser:
    """The ``fare run`` argument parser."""
    ap = argparse.ArgumentParser(
        prog="fare run", description="The whole FARE pipeline (prompts, profile, AALS layers, lambda*, test evaluation, "
        "ablations, generation transfer) and a report of the paper's Tables 2-8 in --out/report.")
    add_common_flags(ap)
    ap.add_argument("--prompts", type=Path, default=None,
                    help="prompt set folder written by fare prompts (default: built from --seed)")
    ap.add_argument("--axes", default=None, help="comma-separated subset of the nine demographic axes (default: all)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per profiling batch (default 16)")
    add_fsp_options(ap)
    ap.add_argument("--lam-probe", type=float, default=1.0, help="lambda of each single-layer AALS probe (default 1.0)")
    ap.add_argument("--quantile", type=quantile_arg, default=DEFAULT_QUANTILE,
                    help=f"AALS selects layers whose R(l) exceeds this quantile of R (default {DEFAULT_QUANTILE:g})")
    ap.add_argument("--grid", type=_lambda_grid, default=list(DEFAULT_LAMBDA_GRID), metavar="L1,L2,...",
                    help="lambda values tried for lambda* (default " + ",".join(f"{x:g}" for x in DEFAULT_LAMBDA_GRID)
                         + "; 0 = no intervention; ties go to the smallest lambda)")
    ap.add_argument("--beta", type=budget_arg, default=1.0,
                    help="perplexity budget of lambda*: PPL <= (1 + beta) x base PPL (default 1.0)")
    ap.add_argument("--lambda-max", type=budget_arg, default=None, help="ignore grid values above this (default: none)")
    ap.add_argument("--control-lambda", type=float, default=1.0,
                    help="lambda of the Table 4/5 controls (paper: 1.0), and of Tables 3, 7, 8 when lambda* is "
                         "infeasible (stated in their titles)")
    ap.add_argument("--skip-transfer", action="store_true", help="skip the generation transfer stage (Table 7)")
    return ap


class _StageLog:
    """Wall time (timings.json) and decoder-layer work (work.json) of each stage of one invocation."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.work: dict[str, dict] = {}
        self.counter = None  # a LayerWork on the model, once it is loaded

    def __call__(self, name: str, fn):
        t = time.perf_counter()
        before = self.counter.snapshot() if self.counter is not None else None
        r = fn()
        self.timings[name] = round(time.perf_counter() - t, 3)
        if before is not None:
            self.work[name] = {k: v - before[k] for k, v in self.counter.snapshot().items()}
        return r

    def status(self) -> str:
        """Work so far, for the progress lines."""
        n = self.counter.token_layer_evals if self.counter is not None else 0
        return f"{n:,} token-layer evaluations in this run so far"

    def write(self, out: Path, engine: str) -> float:
        self.timings["total"] = round(time.perf_counter() - self.t0, 3)
        write_json(out / "timings.json", self.timings)
        self.work["total"] = {k: sum(w[k] for w in self.work.values()) for k in ("token_layer_evals", "layer_calls")}
        write_json(out / "work.json", {"unit": "token-layer evaluations = positions of each decoder-layer call "
                                               "(padding included) summed over calls; layer_calls = decoder-layer calls",
                                       "engine": engine, "stages": self.work})
        return self.timings["total"]


def _run(args) -> int:
    from .work import LayerWork

    out = Path(args.out)
    ps = _prompt_set(args)  # validates axes / emptiness before the model loads
    timed = _StageLog()
    ctx = timed("load_model", lambda: load_ctx(args))
    timed.counter = LayerWork(ctx.model)
    with timed.counter:
        return _stages(args, ctx, ps, out, timed)


def _stages(args, ctx: Ctx, ps, out: Path, timed: _StageLog) -> int:
    from .profiling import profile_model
    from .stages import (
        intervention_lambda,
        run_ablate,
        run_evaluate,
        run_layers,
        run_tune,
    )
    from .transfer import PROTOCOLS, run_transfer

    resume = not args.no_resume
    opts = fsp_options(args)

    def run_stage(name: str, key: dict, fn):
        return timed(name, lambda: stage(out / name, key, fn, resume=resume, log=ctx.log, heartbeat=ctx.heartbeat,
                                         status=timed.status))

    base_key = {**ctx.key(), "prompts": prompts_sha(ps), "n_prompts": len(ps.prompts), "prompt_seed": ps.meta.get("seed")}

    def prompts_fn(d):
        ps.write(d)
        return {"n_prompts": len(ps.prompts), **{k: ps.meta[k] for k in ("n_neutral", "n_demographic", "n_by_split")}}

    k_prompts = {**base_key, "stage": "prompts"}
    run_stage("prompts", k_prompts, prompts_fn)

    k_profile = {**k_prompts, "stage": "profile", "batch_size": args.batch_size, "fsp": opts.to_dict()}

    def profile_fn(d):
        r = profile_model(ctx.model, ctx.tokenizer, ps, d, model_id=ctx.model_id, split="validation",
                          batch_size=args.batch_size, options=opts, progress=ctx.progress,
                          extra_manifest={"revision": ctx.revision})
        return {"descriptors": r["result"].descriptors}

    prof = run_stage("profile", k_profile, profile_fn)
    phi, pl = load_phi(ctx, out / "profile" / "phi.safetensors")

    k_layers = {**k_profile, "stage": "layers", "lam_probe": args.lam_probe, "quantile": args.quantile,
                "phi": file_sha(out / "profile" / "phi.safetensors")}
    run_stage("layers", k_layers, lambda d: run_layers(ctx, phi, pl, ps, d, lam_probe=args.lam_probe,
                                                       quantile=args.quantile))
    aals = json.loads((out / "layers" / "aals.json").read_text())
    sel = aals["selected"]

    k_tune = {**k_layers, "stage": "tune", "grid": args.grid, "beta": args.beta, "lambda_max": args.lambda_max}
    op = run_stage("tune", k_tune, lambda d: run_tune(ctx, phi, pl, sel, ps, d, grid=args.grid, beta=args.beta,
                                                      lambda_max=args.lambda_max))
    lam = op["lambda_star"]
    lam_used = intervention_lambda(lam, args.control_lambda)  # the lambda of Tables 3, 6, 7 and 8

    k_eval = {**k_tune, "stage": "evaluate"}
    run_stage("evaluate", k_eval, lambda d: run_evaluate(ctx, phi, pl, sel, lam, ps, d))
    k_abl = {**k_eval, "stage": "ablate", "control_lambda": args.control_lambda, "random_seeds": args.random_seeds}
    run_stage("ablate", k_abl, lambda d: run_ablate(ctx, phi, pl, sel, lam, ps, prof["descriptors"], d,
                                                    control_lambda=args.control_lambda, n_random=args.random_seeds))
    stages = ["prompts", "profile", "layers", "tune", "evaluate", "ablate"]
    keys = {"prompts": k_prompts, "profile": k_profile, "layers": k_layers, "tune": k_tune, "evaluate": k_eval, "ablate": k_abl}
    if not args.skip_transfer:
        k_tr = {**k_tune, "stage": "transfer", "control_lambda": args.control_lambda, "protocols": list(PROTOCOLS)}
        run_stage("transfer", k_tr, lambda d: run_transfer(ctx, phi, pl, sel, lam, d, control_lambda=args.control_lambda))
        stages.append("transfer")
        keys["transfer"] = k_tr

    manifest = {
        "command": "run", "model": ctx.model_id, "revision": ctx.revision,
        "model_type": ctx.model_type, "seed": ctx.seed, "sizes": asdict(ctx.sizes),
        "splits": {"prompts": ps.meta.get("n_by_split"), "validation_fraction": ctx.validation_fraction,
                   "crows_validation": "layers/validation_split.json", "crows_test": "evaluate/test_split.json",
                   "rule": "sha256(seed|purpose|id) ranking; first round(n*validation_fraction) = validation"},
        "ppl_source": ctx.ppl_source, "engine": ctx.engine_mode, "fsp": opts.to_dict(), "selected_layers": sel,
        "aals_fallback": aals["fallback"], "aals_threshold": aals["threshold"], "aals_quantile": aals["quantile"],
        "lambda_star": lam, "feasible": op["feasible"], "tune_reason": op["reason"], "lambda_used": lam_used,
        "control_lambda": args.control_lambda, "versions": versions(),
        "stage_keys": {s: key_hash(keys[s]) for s in stages},
        "scoring": "direct model log-likelihoods with the lm-eval formulation of fare_crows_pairs / fare_truthfulqa / "
                   "fare_perplexity (fare_pipeline.evalsets)",
    }
    timed("report", lambda: write_report(out, stages, manifest, log=ctx.log))
    total = timed.write(out, ctx.engine_mode)
    print(f"FARE report: {out / 'report'} (layers {sel}, lambda* {lam}; {total:.1f} s)")
    return 0


def report_header(manifest: dict) -> list[str]:
    """The first lines of report.md: the operating point and every lambda the tables use, what lambda* = 0
    or an infeasible lambda* means for them, and an AALS min_layers fallback."""
    lam, sel, ctl = manifest["lambda_star"], manifest["selected_layers"], manifest["control_lambda"]
    ctl_line = f"Tables 4 and 5 use the control lambda = {ctl:g} (stated in their titles); Table 2 masks experts (no ARR)."
    if lam is None:
        lines = [f"**No feasible lambda\\*:** {manifest['tune_reason']}. Table 6 reports the baseline only; Tables 3, "
                 f"7 and 8 use the control lambda = {ctl:g} instead (stated in their titles). {ctl_line}"]
    elif lam == 0:
        lines = [f"**lambda\\* = 0: the operating point is no intervention.** No lambda > 0 of the grid brought "
                 f"CrowS-Pairs closer to parity within the perplexity budget ({manifest['tune_reason']}), so Tables 3, "
                 f"6, 7 and 8 compare the unmodified model with itself (all at lambda = 0). {ctl_line}"]
    else:
        lines = [f"Operating point: ARR at lambda\\* = {lam:g} on AALS layers {sel}; Tables 3, 6, 7 and 8 use it. "
                 f"{ctl_line}"]
    if manifest.get("aals_fallback"):
        lines.append(f"**AALS fallback:** no layer's R(l) exceeded the q{manifest['aals_quantile']:g} threshold "
                     f"({manifest['aals_threshold']:.4g}); the min_layers rule took the layer(s) with the largest R: {sel}.")
    return lines


def write_report(out: Path, stages: list[str], manifest: dict, log=print) -> Path:
    """Collect every table (CSV + Markdown) and plot into ``out/report`` with ``report.md`` and ``manifest.json``."""
    from .tables import write_table

    def build(d: Path) -> dict:
        import csv

        with open(out / "profile" / "fsp_layers.csv") as fh:
            rows = list(csv.DictReader(fh))
        t51 = [{"layer": int(r["layer"]), "jsd": float(r["jsd"]), "entropy_diff": float(r["entropy_diff"]),
                "gini": float(r["gini"]), "top_share": float(r["top_share"]), "rho_phi_f": float(r["spearman_phi_f"]),
                **{k: float(v) for k, v in r.items() if k.startswith("jsd_")}} for r in rows]
        write_table(t51, d / "table5_1_routing_sensitivity", digits=4,
                    title="Section 5.1: per-layer routing sensitivity (JSD nats, entropy difference, descriptors)")
        for stem, title in (("fsp_layers", "FSP per-layer JSD, entropy difference and descriptors (Table 3 inputs)"),
                            ("fsp_experts", "FSP per-expert metrics and phi (Eq. 1-4)")):
            with open(out / "profile" / f"{stem}.csv") as fh:
                write_table(list(csv.DictReader(fh)), d / stem, title=title)
        for s in stages:
            for f in sorted((out / s).glob("*")):
                if f.suffix in (".csv", ".md", ".png") and not f.stem.startswith(("per_item", "fsp_")):
                    shutil.copyfile(f, d / f.name)
        lines = [f"# FARE report: {manifest['model']}", "", *[x for line in report_header(manifest) for x in (line, "")],
                 f"AALS layers {manifest['selected_layers']}, lambda* = {manifest['lambda_star']} ({manifest['tune_reason']}).", ""]
        for sec, stems in REPORT_TABLES.items():
            lines.append(f"## Section {sec}")
            for stem in stems:
                if (d / f"{stem}.md").is_file():
                    lines += ["", (d / f"{stem}.md").read_text().rstrip(), ""]
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in sorted(d.glob("*.png"))]
        (d / "report.md").write_text("\n".join(lines) + "\n")
        write_json(d / "manifest.json", manifest)
        return {"tables": sorted(p.stem for p in d.glob("*.csv"))}

    key = {"stage": "report", **manifest}
    stage(out / "report", key, build, resume=False, log=log)
    return out / "report"
