"""``fare layers | tune | ablate | transfer | run``: argument parsing and the one-command pipeline.

``fare run --model M --out DIR``: prompts -> profile -> layers -> tune -> evaluate -> ablate ->
transfer -> report, each stage a folder of DIR (resumable, see :mod:`fare_pipeline.stages`).
``DIR/report`` holds every table of the paper's sections 5.1-5.5 as CSV + Markdown, the plots and
``manifest.json`` (model id, revision, seeds, splits, sizes, versions, stage keys);
``DIR/timings.json`` holds wall times (kept out of the number files) and ``DIR/work.json`` the
decoder-layer work per stage (:class:`fare_pipeline.work.LayerWork`; a resumed stage did none).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .aals import DEFAULT_LAMBDA_GRID, DEFAULT_QUANTILE
from .stages import Ctx, Sizes, key_hash, load_phi, stage, write_json


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


def _floats(value: str) -> list[float]:
    try:
        out = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
    if not out:
        raise argparse.ArgumentTypeError(f"{value!r}: expected at least one number")
    return out


def _ints(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected comma-separated layer indices, e.g. 2,5") from None


def _opt_int(value: str):
    if value in ("all", "none"):
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: allowed: a positive integer or 'all'") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: allowed: a positive integer or 'all'")
    return n


SIZE_FLAGS = {  # flag -> (Sizes field, type)
    "--contexts-per-descriptor": ("contexts_per_descriptor", str),
    "--crows-val": ("crows_val", _opt_int), "--crows-test": ("crows_test", _opt_int),
    "--ppl-val": ("ppl_val", _opt_int), "--ppl-test": ("ppl_test", _opt_int), "--tqa": ("tqa", _opt_int),
    "--bold": ("bold", int), "--stereo-completion": ("stereo_completion", _opt_int), "--stereoset": ("stereoset", int),
    "--max-new-tokens": ("max_new_tokens", int), "--permutations": ("n_permutations", int),
    "--bootstrap": ("n_bootstrap", int), "--mask-n": ("mask_n", int), "--baseline-n": ("baseline_n", int),
}


def _common(ap: argparse.ArgumentParser, out_required: bool = True) -> None:
    ap.add_argument("--model", required=True, help="hub id, local path, fare-tiny or fare-tiny:<model_type>")
    ap.add_argument("--revision", default=None)
    ap.add_argument("--out", required=out_required, type=Path)
    ap.add_argument("--seed", type=int, default=0, help="seed of every split, subset and control (recorded)")
    ap.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quick", action="store_true", help="CI-sized data (see Sizes.quick); explicit size flags win")
    for flag, (name, typ) in SIZE_FLAGS.items():
        ap.add_argument(flag, dest=name, type=typ, default=None, help=f"size: {name} (default: full run value)")
    ap.add_argument("--validation-fraction", type=float, default=0.5)
    ap.add_argument("--ppl-source", default="prompts", choices=["prompts", "harmless"])
    ap.add_argument("--engine", default="cached", choices=["cached", "naive"],
                    help="cached = prefix trees + kept base pass (exact); naive = full forward per configuration")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--arr-target", default="logits", choices=["logits", "selection"],
                    help="ARR on the router logits (Eq. 6) or on the selection score (bias-after-score routers)")
    ap.add_argument("--no-keep-base", action="store_true", help="re-run the base pass per stage (less memory)")
    ap.add_argument("--random-seeds", type=int, default=5, help="seeds averaged for random controls/baselines/masks")
    ap.add_argument("--progress", action="store_true", help="progress bars (default: when stderr is a terminal)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-resume", action="store_true", help="recompute stages even when their outputs match")


def _sizes(args) -> Sizes:
    s = Sizes.quick() if args.quick else Sizes()
    for name, _ in SIZE_FLAGS.values():
        v = getattr(args, name)
        if v is not None:
            if name == "contexts_per_descriptor":
                v = v if v == "all" else int(v)
            setattr(s, name, v)
    return s


def _ctx(args) -> Ctx:
    from fare_models.surgery import RoutingController

    from .profiling import load_model

    model, tok, model_id = load_model(args.model, revision=args.revision, device=args.device, dtype=args.dtype)
    return Ctx(model=model, tokenizer=tok, model_id=model_id, model_type=RoutingController.of(model).model_type,
               revision=args.revision, seed=args.seed, sizes=_sizes(args), validation_fraction=args.validation_fraction,
               ppl_source=args.ppl_source, engine_mode=args.engine, batch_tokens=args.batch_tokens,
               keep_base=not args.no_keep_base, arr_target=args.arr_target,
               progress=args.progress or (sys.stderr.isatty() and not args.no_progress),
               log=lambda msg: print(msg, file=sys.stderr))


def _prompt_set(args, ctx: Ctx):
    from .prompts import PromptSet, build_prompt_set

    if getattr(args, "prompts", None):
        return PromptSet.read(args.prompts)
    axes = [a.strip() for a in args.axes.split(",") if a.strip()] if getattr(args, "axes", None) else None
    return build_prompt_set(seed=ctx.seed, axes=axes, contexts_per_descriptor=ctx.sizes.contexts_per_descriptor,
                            validation_fraction=ctx.validation_fraction)


def _read_json(path: Path, name: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / name
    if not p.is_file():
        raise FileNotFoundError(f"{str(p)!r} does not exist (expected {name} from an earlier stage)")
    return json.loads(p.read_text())


def _selected(args) -> list[int]:
    if getattr(args, "select", None):
        return args.select
    if not getattr(args, "layers", None):
        raise ValueError("pass --layers DIR (output of `fare layers`) or --select L1,L2")
    return list(_read_json(args.layers, "aals.json")["selected"])


def _lambda_star(args):
    if getattr(args, "lam", None) is not None:
        return args.lam
    if not getattr(args, "tune", None):
        raise ValueError("pass --tune DIR (output of `fare tune`) or --lam X")
    return _read_json(args.tune, "lambda_star.json")["lambda_star"]


def _fail(cmd: str, err: Exception) -> int:
    print(f"fare {cmd}: {err}", file=sys.stderr)
    return 2


def _file_sha(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _upstream(args) -> dict:
    """Inputs of a single-stage command for its stage key (file contents, not only paths)."""
    out = {k: str(getattr(args, k)) for k in ("select", "lam") if getattr(args, k, None) is not None}
    for k, name in (("profile", None), ("layers", "aals.json"), ("tune", "lambda_star.json"), ("prompts", "prompts.jsonl")):
        p = getattr(args, k, None)
        if p is not None:
            p = Path(p) / name if name and Path(p).is_dir() else Path(p)
            out[k] = _file_sha(p) if p.is_file() else str(p)
    return out


# --------------------------------------------------------------------------- single-stage commands


def _stage_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=doc)
    _common(ap)
    ap.add_argument("--profile", required=True, type=Path, help="phi.safetensors from `fare profile`")
    ap.add_argument("--profile-check", default="model", choices=["model", "shape"])
    ap.add_argument("--prompts", type=Path, default=None, help="prompt set folder (default: built from --seed)")
    ap.add_argument("--axes", default=None)
    return ap


def layers(argv: list[str]) -> int:
    """``fare layers``: AALS (Eq. 5) - per-layer ARR probes at lambda_probe on the validation split."""
    ap = _stage_parser("fare layers", layers.__doc__)
    ap.add_argument("--lam-probe", type=float, default=1.0)
    ap.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE)
    args = ap.parse_args(argv)
    from .stages import run_layers

    try:
        ctx = _ctx(args)
        phi, pl = load_phi(ctx, args.profile, args.profile_check == "model")
        ps = _prompt_set(args, ctx)
        key = {**ctx.key(), "stage": "layers", "lam_probe": args.lam_probe, "quantile": args.quantile, **_upstream(args)}
        res = stage(args.out, key, lambda d: run_layers(ctx, phi, pl, ps, d, lam_probe=args.lam_probe,
                                                           quantile=args.quantile), resume=not args.no_resume, log=ctx.log)
    except (ValueError, FileNotFoundError) as e:
        return _fail("layers", e)
    print(f"AALS selected layers {res['selected']} -> {args.out}")
    return 0


def tune(argv: list[str]) -> int:
    """``fare tune``: lambda* (Eq. 7) over a grid, CrowS parity target, PPL budget beta."""
    ap = _stage_parser("fare tune", tune.__doc__)
    ap.add_argument("--layers", type=Path, default=None, help="output folder of `fare layers` (aals.json)")
    ap.add_argument("--select", type=_ints, default=None, help="explicit layers instead of --layers")
    ap.add_argument("--grid", type=_floats, default=list(DEFAULT_LAMBDA_GRID))
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--lambda-max", type=float, default=None)
    args = ap.parse_args(argv)
    from .stages import run_tune

    try:
        ctx = _ctx(args)
        phi, pl = load_phi(ctx, args.profile, args.profile_check == "model")
        sel = _selected(args)
        ps = _prompt_set(args, ctx)
        key = {**ctx.key(), "stage": "tune", "grid": args.grid, "beta": args.beta, "lambda_max": args.lambda_max,
               "selected": sel, **_upstream(args)}
        res = stage(args.out, key, lambda d: run_tune(ctx, phi, pl, sel, ps, d, grid=args.grid, beta=args.beta,
                                                         lambda_max=args.lambda_max), resume=not args.no_resume, log=ctx.log)
    except (ValueError, FileNotFoundError) as e:
        return _fail("tune", e)
    print(f"lambda* = {res['lambda_star']} ({res['reason']}) -> {args.out}")
    return 0


def ablate(argv: list[str]) -> int:
    """``fare ablate``: profile controls, expert-identification baselines and group masking (Tables 2-5, 8)."""
    ap = _stage_parser("fare ablate", ablate.__doc__)
    ap.add_argument("--layers", type=Path, default=None)
    ap.add_argument("--select", type=_ints, default=None)
    ap.add_argument("--tune", type=Path, default=None)
    ap.add_argument("--lam", type=float, default=None, help="lambda* instead of --tune")
    ap.add_argument("--control-lambda", type=float, default=1.0, help="lambda of the Table 4 controls (paper: 1.0)")
    args = ap.parse_args(argv)
    from .stages import run_ablate

    try:
        ctx = _ctx(args)
        phi, pl = load_phi(ctx, args.profile, args.profile_check == "model")
        sel, lam = _selected(args), _lambda_star(args)
        ps = _prompt_set(args, ctx)
        desc = args.profile.parent / "fsp_descriptors.json"
        prof = json.loads(desc.read_text())["descriptors"] if desc.is_file() else None
        key = {**ctx.key(), "stage": "ablate", "selected": sel, "lambda_star": lam, "control_lambda": args.control_lambda,
               "random_seeds": args.random_seeds, **_upstream(args)}
        stage(args.out, key, lambda d: run_ablate(ctx, phi, pl, sel, lam, ps, prof, d, control_lambda=args.control_lambda,
                                                  n_random=args.random_seeds), resume=not args.no_resume, log=ctx.log)
    except (ValueError, FileNotFoundError) as e:
        return _fail("ablate", e)
    print(f"wrote ablation tables to {args.out}")
    return 0


def transfer(argv: list[str]) -> int:
    """``fare transfer``: baseline vs intervened generations (BOLD, stereotype completion, StereoSet) + paired tests."""
    from .transfer import PROTOCOLS, run_transfer

    ap = _stage_parser("fare transfer", transfer.__doc__)
    ap.add_argument("--layers", type=Path, default=None)
    ap.add_argument("--select", type=_ints, default=None)
    ap.add_argument("--tune", type=Path, default=None)
    ap.add_argument("--lam", type=float, default=None)
    ap.add_argument("--protocols", default=",".join(PROTOCOLS))
    args = ap.parse_args(argv)
    try:
        protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
        bad = [p for p in protocols if p not in PROTOCOLS]
        if bad or not protocols:
            raise ValueError(f"protocols={args.protocols!r}; allowed: a comma-separated subset of {', '.join(PROTOCOLS)}")
        ctx = _ctx(args)
        phi, pl = load_phi(ctx, args.profile, args.profile_check == "model")
        sel, lam = _selected(args), _lambda_star(args)
        key = {**ctx.key(), "stage": "transfer", "selected": sel, "lambda_star": lam, "protocols": protocols, **_upstream(args)}
        stage(args.out, key, lambda d: run_transfer(ctx, phi, pl, sel, lam, d, protocols=protocols),
              resume=not args.no_resume, log=ctx.log)
    except (ValueError, FileNotFoundError) as e:
        return _fail("transfer", e)
    print(f"wrote generation-transfer tables to {args.out}")
    return 0


# --------------------------------------------------------------------------- one command


def run(argv: list[str]) -> int:
    """``fare run --model M --out DIR``: the whole FARE pipeline and a report of Tables 2-8 (sections 5.1-5.5)."""
    ap = argparse.ArgumentParser(prog="fare run", description=run.__doc__)
    _common(ap)
    ap.add_argument("--prompts", type=Path, default=None, help="prompt set folder (default: build it)")
    ap.add_argument("--axes", default=None, help="comma-separated subset of the nine axes")
    ap.add_argument("--batch-size", type=int, default=16, help="profiling batch size")
    ap.add_argument("--lam-probe", type=float, default=1.0)
    ap.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE)
    ap.add_argument("--grid", type=_floats, default=list(DEFAULT_LAMBDA_GRID))
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--lambda-max", type=float, default=None)
    ap.add_argument("--control-lambda", type=float, default=1.0)
    ap.add_argument("--skip-transfer", action="store_true")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        return _fail("run", e)


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
    timed = _StageLog()
    ctx = timed("load_model", lambda: _ctx(args))
    timed.counter = LayerWork(ctx.model)
    with timed.counter:
        return _stages(args, ctx, out, timed)


def _stages(args, ctx: Ctx, out: Path, timed: _StageLog) -> int:
    from fare_models.surgery import RoutingController

    from .profiling import profile_model
    from .stages import run_ablate, run_evaluate, run_layers, run_tune
    from .transfer import run_transfer

    ps = _prompt_set(args, ctx)  # validates axes / emptiness before any heavy work
    resume = not args.no_resume
    import hashlib

    prompts_sha = hashlib.sha256("\n".join(json.dumps(p.to_dict(), sort_keys=True) for p in ps.prompts).encode()).hexdigest()
    base_key = {**ctx.key(), "prompts": prompts_sha[:16], "n_prompts": len(ps.prompts), "prompt_seed": ps.meta.get("seed")}

    def prompts_fn(d):
        ps.write(d)
        return {"n_prompts": len(ps.prompts), **{k: ps.meta[k] for k in ("n_neutral", "n_demographic", "n_by_split")}}

    k_prompts = {**base_key, "stage": "prompts"}
    timed("prompts", lambda: stage(out / "prompts", k_prompts, prompts_fn, resume=resume, log=ctx.log))

    k_profile = {**k_prompts, "stage": "profile", "batch_size": args.batch_size}

    def profile_fn(d):
        r = profile_model(ctx.model, ctx.tokenizer, ps, d, model_id=ctx.model_id, split="validation",
                          batch_size=args.batch_size, progress=ctx.progress,
                          extra_manifest={"revision": ctx.revision})
        return {"descriptors": r["result"].descriptors}

    prof = timed("profile", lambda: stage(out / "profile", k_profile, profile_fn, resume=resume, log=ctx.log))
    phi, pl = load_phi(ctx, out / "profile" / "phi.safetensors")

    k_layers = {**k_profile, "stage": "layers", "lam_probe": args.lam_probe, "quantile": args.quantile,
                "phi": _file_sha(out / "profile" / "phi.safetensors")}
    aals = timed("layers", lambda: stage(out / "layers", k_layers, lambda d: run_layers(
        ctx, phi, pl, ps, d, lam_probe=args.lam_probe, quantile=args.quantile), resume=resume, log=ctx.log))
    sel = aals["selected"]

    k_tune = {**k_layers, "stage": "tune", "grid": args.grid, "beta": args.beta, "lambda_max": args.lambda_max}
    op = timed("tune", lambda: stage(out / "tune", k_tune, lambda d: run_tune(
        ctx, phi, pl, sel, ps, d, grid=args.grid, beta=args.beta, lambda_max=args.lambda_max), resume=resume, log=ctx.log))
    lam = op["lambda_star"]

    k_eval = {**k_tune, "stage": "evaluate"}
    timed("evaluate", lambda: stage(out / "evaluate", k_eval, lambda d: run_evaluate(
        ctx, phi, pl, sel, lam, ps, d), resume=resume, log=ctx.log))
    k_abl = {**k_eval, "stage": "ablate", "control_lambda": args.control_lambda, "random_seeds": args.random_seeds}
    timed("ablate", lambda: stage(out / "ablate", k_abl, lambda d: run_ablate(
        ctx, phi, pl, sel, lam, ps, prof["descriptors"], d, control_lambda=args.control_lambda,
        n_random=args.random_seeds), resume=resume, log=ctx.log))
    stages = ["prompts", "profile", "layers", "tune", "evaluate", "ablate"]
    keys = {"prompts": k_prompts, "profile": k_profile, "layers": k_layers, "tune": k_tune, "evaluate": k_eval, "ablate": k_abl}
    if not args.skip_transfer:
        k_tr = {**k_tune, "stage": "transfer", "control_lambda": args.control_lambda}
        timed("transfer", lambda: stage(out / "transfer", k_tr, lambda d: run_transfer(
            ctx, phi, pl, sel, lam, d, control_lambda=args.control_lambda), resume=resume, log=ctx.log))
        stages.append("transfer")
        keys["transfer"] = k_tr

    manifest = {
        "command": "run", "model": ctx.model_id, "revision": ctx.revision,
        "model_type": RoutingController.of(ctx.model).model_type, "seed": ctx.seed, "sizes": asdict(ctx.sizes),
        "splits": {"prompts": ps.meta.get("n_by_split"), "validation_fraction": ctx.validation_fraction,
                   "crows_validation": "layers/validation_split.json", "crows_test": "evaluate/test_split.json",
                   "rule": "sha256(seed|purpose|id) ranking; first round(n*validation_fraction) = validation"},
        "ppl_source": ctx.ppl_source, "engine": ctx.engine_mode, "selected_layers": sel, "lambda_star": lam,
        "feasible": op["feasible"], "tune_reason": op["reason"], "versions": versions(),
        "stage_keys": {s: key_hash(keys[s]) for s in stages},
        "scoring": "direct model log-likelihoods with the lm-eval formulation of fare_crows_pairs / fare_truthfulqa / "
                   "fare_perplexity (fare_pipeline.evalsets)",
    }
    timed("report", lambda: write_report(out, stages, manifest))
    total = timed.write(out, ctx.engine_mode)
    print(f"FARE report: {out / 'report'} (layers {sel}, lambda* {lam}; {total:.1f} s)")
    return 0


def write_report(out: Path, stages: list[str], manifest: dict) -> Path:
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
        lines = [f"# FARE report: {manifest['model']}", "",
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
    stage(out / "report", key, build, resume=False)
    return out / "report"
