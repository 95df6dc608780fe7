"""``fare robustness``: the four design-choice checks of the FARE paper's section 5.5 as one command.

    fare robustness --model M --out DIR [--quick]

(a) ARD-only vs composite profile: phi from ARD alone (Eq. 1, weights ard=1, others 0) and the
    composite phi (Eq. 4, SPEC section 3 weights), recomputed from the same routing aggregates,
    each with ARR (Eq. 6) at the same lambda on the same AALS layers.
(b) AALS (Eq. 5) vs fixed middle layers (as many consecutive MoE layers as AALS selected, centred,
    ties to the later window), and AALS seed stability: prompt set, profile and AALS rerun for
    ``--seeds`` seeds (default 3); core layers = selected under every seed, mean pairwise Jaccard.
(c) Soft reweighting (ARR) vs hard masking at matched perplexity: the top-n experts by phi over
    the AALS layers are masked for a grid of n; n* = argmin_n |PPL_mask(n) - PPL_ARR| on the
    validation split (ties -> smaller n); both are reported on the test split.
(d) Length-matched CrowS-Pairs: FARE vs base on all test pairs and on the pairs whose two
    sentences have equal token counts, each with its own paired test.

Every comparison is a paired permutation test with a bootstrap CI
(``fare_analysis.stats.paired_comparison``; SPEC section 9), Benjamini-Hochberg within each check.
All checks use one lambda: lambda* of ``tune`` (Eq. 7), or ``--control-lambda`` when lambda* is 0
or infeasible (stated in every title). Scoring goes through the pipeline's cached
:class:`fare_pipeline.engine.Engine` (one kept base pass per split), and every step is a resumable
atomic stage (:func:`fare_pipeline.stages.stage`) of DIR:
``seed_<s>/{prompts,profile,layers}``, ``tune``, ``ard_profile``, ``checks``, ``report``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np

from fare_core.errors import FareError
from fare_core.files import TEMP_NAME

from .aals import DEFAULT_LAMBDA_GRID, DEFAULT_QUANTILE
from .run import (
    STAGE_SIZES,
    add_common_flags,
    budget_arg,
    load_ctx,
    quantile_arg,
    versions,
)
from .stages import (
    Ctx,
    file_sha,
    key_hash,
    lambda_label,
    load_phi,
    mask_ok,
    paired_test,
    prompts_sha,
    run_layers,
    run_tune,
    split_metrics,
    stage,
    write_json,
)
from .tables import write_table

ARD_ONLY = {"ard": 1.0, "jsd": 0.0, "pmi": 0.0, "ent": 0.0}
MAX_MASK_GRID = 12


# --------------------------------------------------------------------------- rules (pure)


def middle_layers(moe_layers, k: int) -> list[int]:
    """``k`` consecutive MoE layers centred in the stack; an even leftover puts the window later."""
    moe = sorted(int(x) for x in moe_layers)
    if not 1 <= k <= len(moe):
        raise FareError(f"middle-layer count {k}; allowed: 1..{len(moe)} (MoE layers of the model)")
    start = (len(moe) - k + 1) // 2
    return moe[start : start + k]


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def seed_stability(selections: dict) -> dict:
    """{seed: layers} -> core layers (in every selection), union, mean pairwise Jaccard."""
    sets = [set(v) for v in selections.values()]
    pairs = list(itertools.combinations(sets, 2))
    return {"core": sorted(set.intersection(*sets)), "union": sorted(set.union(*sets)),
            "mean_jaccard": float(np.mean([jaccard(a, b) for a, b in pairs])) if pairs else 1.0}


def mask_grid(phi, profile_layers, selected, room: dict, allowed=None) -> list[tuple[int, list]]:
    """[(n, top-n (layer, expert) pairs by phi over ``selected``)] for a grid of n, every set leaving
    each layer at least its top_k experts (``room[layer]`` = num_experts - top_k) and passing
    ``allowed(pairs)`` (e.g. the architecture's own rule: group-limited routers keep 2 per group)."""
    from .controls import mask_sets

    total = sum(room[int(layer)] for layer in selected)
    if total < 1:
        return []
    ns = range(1, total + 1) if total <= MAX_MASK_GRID else sorted({round(x) for x in np.geomspace(1, total, MAX_MASK_GRID)})
    out = []
    for n in ns:
        pairs = mask_sets(phi, profile_layers, selected, n=n, random_draws=0)["top"]
        per_layer = {int(layer): sum(1 for lay, _ in pairs if lay == layer) for layer in selected}
        if all(per_layer[layer] <= room[layer] for layer in per_layer) and (allowed is None or allowed(pairs)):
            out.append((n, pairs))
    return out


def matched_n(ppl_by_n: dict, ppl_target: float) -> int:
    """n whose masking perplexity is closest to ``ppl_target`` (ties -> smaller n)."""
    return min(ppl_by_n, key=lambda n: (abs(ppl_by_n[n] - ppl_target), n))


def operating_lambda(lambda_star, control_lambda: float) -> tuple[float, str]:
    """(lambda of every check, its label): lambda* when it intervenes; ``control_lambda`` when lambda* is
    0 (no intervention: every check would compare the base model with itself) or infeasible (None)."""
    lam = float(lambda_star) if lambda_star else float(control_lambda)
    return lam, lambda_label(lam, lambda_star)


# --------------------------------------------------------------------------- stages


def _ctx_for_seed(ctx: Ctx, seed: int) -> Ctx:
    return ctx if seed == ctx.seed else dataclasses.replace(ctx, seed=seed, _engines={})


def select_for_seed(ctx: Ctx, out: Path, *, batch_size: int, lam_probe: float, quantile: float, resume: bool) -> dict:
    """prompts -> profile -> AALS for ``ctx.seed`` into ``out/{prompts,profile,layers}`` (resumable)."""
    from .profiling import profile_model
    from .prompts import build_prompt_set

    ps = build_prompt_set(seed=ctx.seed, contexts_per_descriptor=ctx.sizes.contexts_per_descriptor,
                          validation_fraction=ctx.validation_fraction)
    k = {**ctx.key(), "prompts": prompts_sha(ps), "stage": "prompts"}

    def prompts_fn(d):
        ps.write(d)
        return {"n_prompts": len(ps.prompts)}

    stage(out / "prompts", k, prompts_fn, resume=resume, log=ctx.log, heartbeat=ctx.heartbeat)
    k = {**k, "stage": "profile", "batch_size": batch_size}
    stage(out / "profile", k, lambda d: {"descriptors": profile_model(
        ctx.model, ctx.tokenizer, ps, d, model_id=ctx.model_id, split="validation", batch_size=batch_size,
        progress=ctx.progress, extra_manifest={"revision": ctx.revision})["result"].descriptors},
        resume=resume, log=ctx.log, heartbeat=ctx.heartbeat)
    phi, pl = load_phi(ctx, out / "profile" / "phi.safetensors")
    k = {**k, "stage": "layers", "lam_probe": lam_probe, "quantile": quantile,
         "phi": file_sha(out / "profile" / "phi.safetensors")}
    aals = stage(out / "layers", k, lambda d: run_layers(ctx, phi, pl, ps, d, lam_probe=lam_probe, quantile=quantile),
                 resume=resume, log=ctx.log, heartbeat=ctx.heartbeat)
    return {"prompt_set": ps, "phi": phi, "profile_layers": pl, "aals": aals, "key": k}


def ard_profile(ctx: Ctx, profile_dir: Path, prompt_set, out: Path) -> dict:
    """ARD-only phi (Eq. 1 alone) from the routing aggregates the composite profile was computed from."""
    from fare_models.profile import save_profile
    from fare_models.surgery import RoutingController, load_routing

    from .fsp import FSPOptions, compute_fsp
    from .profiling import real_expert_mask

    agg, meta = load_routing(profile_dir / "routing")
    ctl = RoutingController.of(ctx.model)
    res = compute_fsp(agg["counts"], agg["tokens"], meta["groups"], prob_sums=agg["prob_sums"],
                      group_axes=prompt_set.group_axes(), layers=meta["layers"],
                      expert_mask=real_expert_mask(ctl, int(meta["num_experts"])), options=FSPOptions(weights=ARD_ONLY))
    save_profile(out / "phi.safetensors", res.phi, meta["layers"], ctx.model_id, ctl.model_type, fsp=res.options,
                 profiling={"source": "routing aggregates of the composite profile", "weights": ARD_ONLY})
    return {"weights": ARD_ONLY}


TEST_COLUMNS = ["comparison", "n", "mean_a", "mean_b", "delta", "ci_low", "ci_high", "pvalue", "pvalue_bh"]


def _tests_table(tests: list[dict], stem: Path, title: str) -> list[dict]:
    from fare_analysis.stats import bh_family

    rows = [{"comparison": t["name"], **{k: t[k] for k in TEST_COLUMNS[1:-1]}} for t in tests]
    rows = bh_family(rows)
    write_table(rows, stem, TEST_COLUMNS, digits=4, title=title)
    return rows


def run_checks(ctx: Ctx, main: dict, phi_ard, lam: float, lam_label: str, middle: list[int],
               seeds: dict, out: Path) -> dict:
    """Checks (a)-(d): one scoring call per split, tables with paired tests (BH within each check)."""
    from fare_models.surgery import RoutingController

    from .engine import make_arr, make_mask

    phi, pl, ps, sel = main["phi"], main["profile_layers"], main["prompt_set"], list(main["aals"]["selected"])
    arr = lambda p, layers: make_arr(ctx.model, p, lam, layers, pl, ctx.arr_target)
    ctl = RoutingController.of(ctx.model)
    room = {m.index: m.num_experts - m.top_k for m in ctl.layers}

    # (c) matched perplexity on the validation split; ExpertMask refuses sets the router cannot route around
    grid = mask_grid(phi, pl, sel, room, lambda pairs: mask_ok(ctx.model, pairs))
    if not grid:
        raise FareError(f"layers {sel} leave no expert to mask (every layer, and routing group, must keep enough)")
    veng, vev = ctx.engine("validation", ps, tqa=False)
    vcfg = [("base", None, None), ("arr", arr(phi, sel), min(sel))]
    vcfg += [(f"mask{n}", make_mask(ctx.model, pairs), min(layer for layer, _ in pairs)) for n, pairs in grid]
    vm = {k: split_metrics(vev, v) for k, v in veng.score(vcfg, desc="robustness: masking grid").items()}
    ppl_mask = {n: vm[f"mask{n}"]["ppl"] for n, _ in grid}
    n_star = matched_n(ppl_mask, vm["arr"]["ppl"])
    masked = dict(grid)[n_star]
    write_table([{"n_masked": n, "ppl_validation": ppl_mask[n], "pref_validation": vm[f"mask{n}"]["pref"],
                  "abs_ppl_gap": abs(ppl_mask[n] - vm["arr"]["ppl"]), "matched": n == n_star} for n, _ in grid],
                out / "masking_grid", digits=4,
                title=f"Hard masking of the top-n phi experts on layers {sel} (validation split); ARR at {lam_label}: "
                      f"PPL {vm['arr']['ppl']:.4f}; n* = argmin |PPL_mask - PPL_ARR| (ties -> smaller n)")

    # test split: every condition in one call
    eng, ev = ctx.engine("test", ps, tqa=True)
    cfg = [("base", None, None), ("fare", arr(phi, sel), min(sel)), ("ard", arr(phi_ard, sel), min(sel)),
           ("middle", arr(phi, middle), min(middle)), ("mask", make_mask(ctx.model, masked), min(lay for lay, _ in masked))]
    m = {k: split_metrics(ev, v) for k, v in eng.score(cfg, desc="robustness: test split").items()}
    b = m["base"]
    gap = lambda x: abs(x - 0.5)
    row = lambda label, k, **extra: {
        "condition": label, **extra, "crows": m[k]["pref"], "delta_crows_pp": 100 * (m[k]["pref"] - b["pref"]),
        "parity_gap": gap(m[k]["pref"]), "tqa": m[k]["tqa"], "delta_tqa_pp": 100 * (m[k]["tqa"] - b["tqa"]),
        "ppl": m[k]["ppl"]}
    n_items = f"n = {len(ev.crows_ids)} CrowS pairs, {len(ev.tqa_ids)} TruthfulQA questions, test split"
    tables = {}

    # (a) profile
    t = [row("Baseline", "base", profile="-"), row("Composite FSP (Eq. 4)", "fare", profile="composite"),
         row("ARD only (Eq. 1)", "ard", profile="ard")]
    write_table(t, out / "robustness_a_profile", digits=4,
                title=f"5.5(a) ARD-only vs composite profile: ARR at {lam_label} on AALS layers {sel} ({n_items})")
    tables["a"] = _tests_table([paired_test(b["crows_items"], m["fare"]["crows_items"], "composite vs base: crows", ctx),
                                paired_test(b["crows_items"], m["ard"]["crows_items"], "ARD-only vs base: crows", ctx),
                                paired_test(m["fare"]["crows_items"], m["ard"]["crows_items"], "ARD-only vs composite: crows", ctx),
                                paired_test(m["fare"]["tqa_items"], m["ard"]["tqa_items"], "ARD-only vs composite: tqa", ctx)],
                               out / "robustness_a_tests", "5.5(a) paired tests (mean_b - mean_a; BH within (a))")

    # (b) layers + seeds
    t = [row("Baseline", "base", layers="-"), row("AALS (Eq. 5)", "fare", layers=sel),
         row("Fixed middle layers", "middle", layers=middle)]
    write_table(t, out / "robustness_b_layers", digits=4,
                title=f"5.5(b) AALS vs fixed middle layers: ARR at {lam_label}, composite phi ({n_items})"
                      + (" - the middle window equals the AALS selection" if middle == sel else ""))
    tables["b"] = _tests_table([paired_test(b["crows_items"], m["fare"]["crows_items"], "AALS vs base: crows", ctx),
                                paired_test(b["crows_items"], m["middle"]["crows_items"], "middle vs base: crows", ctx),
                                paired_test(m["middle"]["crows_items"], m["fare"]["crows_items"], "AALS vs middle: crows", ctx),
                                paired_test(m["middle"]["tqa_items"], m["fare"]["tqa_items"], "AALS vs middle: tqa", ctx)],
                               out / "robustness_b_tests", "5.5(b) paired tests (mean_b - mean_a; BH within (b))")
    stab = seed_stability({s: v["selected"] for s, v in seeds.items()})
    write_table([{"seed": s, "selected": v["selected"], f"jaccard_vs_seed_{ctx.seed}": jaccard(v["selected"], sel),
                  "ratio": [round(float(r), 6) for r in v["ratio"]], "threshold": v["threshold"],
                  "fallback": v["fallback"]}
                 for s, v in seeds.items()], out / "robustness_b_seeds", digits=4,
                title=f"5.5(b) AALS seed stability over seeds {list(seeds)}: core layers {stab['core']}, "
                      f"union {stab['union']}, mean pairwise Jaccard {stab['mean_jaccard']:.3f}"
                      + ("; fallback = no layer's R exceeded the quantile, AALS's min_layers rule picked the top-R "
                         "layer" if any(v["fallback"] for v in seeds.values()) else ""))

    # (c) soft vs hard
    t = [row("Baseline", "base", method="-", n_masked=0, ppl_validation=vm["base"]["ppl"]),
         row("ARR (soft reweighting)", "fare", method="arr", n_masked=0, ppl_validation=vm["arr"]["ppl"]),
         row(f"Masking top-{n_star} phi (hard)", "mask", method="mask", n_masked=n_star, ppl_validation=ppl_mask[n_star])]
    write_table(t, out / "robustness_c_soft_vs_hard", digits=4,
                title=f"5.5(c) soft reweighting (ARR at {lam_label}) vs hard masking at matched perplexity "
                      f"(n* matched on the validation split; layers {sel}; {n_items})")
    tables["c"] = _tests_table([paired_test(b["crows_items"], m["fare"]["crows_items"], "ARR vs base: crows", ctx),
                                paired_test(b["crows_items"], m["mask"]["crows_items"], "masking vs base: crows", ctx),
                                paired_test(m["mask"]["crows_items"], m["fare"]["crows_items"], "ARR vs masking: crows", ctx)],
                               out / "robustness_c_tests", "5.5(c) paired tests (mean_b - mean_a; BH within (c))")

    # (d) length-matched CrowS
    lm = np.asarray(ev.crows_length_matched, bool)
    d_rows, d_tests = [], []
    for subset, idx in (("all pairs", np.ones_like(lm)), ("length-matched", lm)):
        if not idx.any():
            d_rows.append({"subset": subset, "n": 0, "crows_base": None, "crows_fare": None, "delta_pp": None})
            continue
        d_rows.append({"subset": subset, "n": int(idx.sum()), "crows_base": float(b["crows_items"][idx].mean()),
                       "crows_fare": float(m["fare"]["crows_items"][idx].mean()),
                       "delta_pp": 100 * float(m["fare"]["crows_items"][idx].mean() - b["crows_items"][idx].mean())})
        d_tests.append(paired_test(b["crows_items"][idx], m["fare"]["crows_items"][idx], f"FARE vs base: crows, {subset}", ctx))
    write_table(d_rows, out / "robustness_d_length_matched", digits=4,
                title=f"5.5(d) CrowS-Pairs, all test pairs vs the length-matched ones (equal token counts under the "
                      f"model's tokenizer); ARR at {lam_label} on layers {sel}")
    tables["d"] = _tests_table(d_tests, out / "robustness_d_tests", "5.5(d) paired tests, one per subset (BH within (d))")

    write_table([{"pair_id": pid, "length_matched": bool(x), **{k: float(m[k]["crows_items"][i]) for k in m}}
                 for i, (pid, x) in enumerate(zip(ev.crows_ids, lm))], out / "per_item_crows")
    sel_info = {"lambda": lam, "lambda_label": lam_label, "selected": sel, "middle": middle, "n_star": n_star,
                "masked": masked, "mask_grid": [n for n, _ in grid], "seed_stability": stab,
                "seed_selections": {str(s): v["selected"] for s, v in seeds.items()}, "test_split": ev.info}
    write_json(out / "checks.json", sel_info)
    return {k: v for k, v in sel_info.items() if k != "test_split"}


REPORT = [("a", "ARD-only vs composite profile", ["robustness_a_profile", "robustness_a_tests"]),
          ("b", "AALS vs fixed middle layers; seed stability",
           ["robustness_b_layers", "robustness_b_tests", "robustness_b_seeds"]),
          ("c", "Soft reweighting vs hard masking at matched perplexity",
           ["robustness_c_soft_vs_hard", "robustness_c_tests", "masking_grid"]),
          ("d", "Length-matched CrowS-Pairs", ["robustness_d_length_matched", "robustness_d_tests"])]


def write_report(out: Path, manifest: dict) -> Path:
    """``out/report``: every robustness table (CSV + Markdown), robustness.md, manifest.json."""
    import shutil

    def build(d: Path) -> dict:
        lines = [f"# FARE robustness (section 5.5): {manifest['model']}", "",
                 (f"Every check uses ARR at {manifest['lambda_label']} on AALS layers {manifest['selected_layers']} "
                  f"(seed {manifest['seed']}); paired permutation tests with bootstrap CIs, BH within each check."), ""]
        for tag, title, stems in REPORT:
            lines += [f"## ({tag}) {title}", ""]
            for stem in stems:
                for ext in (".csv", ".md"):
                    shutil.copyfile(out / "checks" / f"{stem}{ext}", d / f"{stem}{ext}")
                lines += [(d / f"{stem}.md").read_text().rstrip(), ""]
        (d / "robustness.md").write_text("\n".join(lines))
        write_json(d / "manifest.json", manifest)
        return {"tables": sorted(p.stem for p in d.glob("*.csv"))}

    stage(out / "report", {"stage": "report", **manifest}, build, resume=False)
    return out / "report"


# --------------------------------------------------------------------------- command


def robustness(argv: list[str]) -> int:
    """``fare robustness --model M --out DIR``: the four design-choice checks of section 5.5 with paired tests."""
    ap = argparse.ArgumentParser(prog="fare robustness", description=(
        "The four design-choice checks of the paper's section 5.5 with paired tests: (a) ARD-only vs composite "
        "profile, (b) AALS vs fixed middle layers and AALS seed stability, (c) soft reweighting vs hard masking at "
        "matched perplexity, (d) length-matched CrowS-Pairs; report in --out/report/robustness.md."))
    add_common_flags(ap, sizes=STAGE_SIZES["robustness"], random_seeds=False)
    ap.add_argument("--seeds", type=int, default=3,
                    help="seeds of the AALS stability check, from --seed on (default 3)")
    ap.add_argument("--middle-layers", type=int, default=None,
                    help="size of the fixed middle-layer window (default: as many layers as AALS selects)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per profiling batch (default 16)")
    ap.add_argument("--lam-probe", type=float, default=1.0, help="lambda of the AALS probes, Eq. 5 (default 1.0)")
    ap.add_argument("--quantile", type=quantile_arg, default=DEFAULT_QUANTILE,
                    help=f"AALS selects layers whose R(l) exceeds this quantile of R (default {DEFAULT_QUANTILE:g})")
    ap.add_argument("--beta", type=budget_arg, default=1.0,
                    help="perplexity budget of lambda*: PPL <= (1 + beta) x base PPL (default 1.0)")
    ap.add_argument("--control-lambda", type=float, default=1.0,
                    help="lambda of every check when lambda* is 0 or infeasible (default 1.0)")
    ap.add_argument("--lam", type=float, default=None,
                    help="lambda of every check instead of lambda* (the tune stage is then skipped)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        raise FareError(f"--seeds {args.seeds}; allowed: an integer >= 1")
    for flag, value in (("--control-lambda", args.control_lambda), ("--lam", args.lam)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise FareError(f"{flag} {value}; allowed: a finite number > 0")
    try:
        return _robustness(args)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, FareError):
            raise
        raise FareError(str(e)) from e


def _ours(name: str) -> bool:
    """Entries `fare robustness` writes into --out (stage folders, their temp siblings, timings)."""
    return (name.startswith("seed_") or name in ("tune", "ard_profile", "checks", "report", "timings.json")
            or TEMP_NAME.match(name) is not None)


def _robustness(args) -> int:
    out, resume, t0 = Path(args.out), not args.no_resume, time.perf_counter()
    foreign = [] if not out.is_dir() else [p.name for p in out.iterdir() if not _ours(p.name)]
    if (out.exists() and not out.is_dir()) or foreign:
        raise FareError(f"--out {str(out)!r} holds {foreign[0] if foreign else 'a file'!r}, which is not part of a "
                        "fare robustness folder; choose a new or empty folder")
    ctx = load_ctx(args)  # an unloadable --model is a one-line FareError (profiling.load_model)
    if args.middle_layers is not None:
        middle_layers(ctx.moe_layers, args.middle_layers)  # a bad window size fails before any compute
    run = {"resume": resume, "log": ctx.log, "heartbeat": ctx.heartbeat}  # stage() options
    say = lambda msg: ctx.log(f"[robustness] {msg} ({time.perf_counter() - t0:.1f} s)")
    opts = {"batch_size": args.batch_size, "lam_probe": args.lam_probe, "quantile": args.quantile, "resume": resume}
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = {}
    for s in seeds:
        runs[s] = select_for_seed(_ctx_for_seed(ctx, s), out / f"seed_{s}", **opts)
        say(f"seed {s}: AALS layers {runs[s]['aals']['selected']}")
    main = runs[args.seed]
    sel = list(main["aals"]["selected"])
    k_tune = {**main["key"], "stage": "tune", "grid": list(DEFAULT_LAMBDA_GRID), "beta": args.beta}
    if args.lam is None:
        op = stage(out / "tune", k_tune, lambda d: run_tune(ctx, main["phi"], main["profile_layers"], sel,
                                                            main["prompt_set"], d, beta=args.beta), **run)
        lam, lam_label = operating_lambda(op["lambda_star"] if op["feasible"] else None, args.control_lambda)
        say(f"lambda* {op['lambda_star']} ({op['reason']}); checks use {lam_label}")
    else:
        op = {"lambda_star": None, "feasible": None, "reason": "not tuned: --lam given"}
        lam, lam_label = float(args.lam), f"lambda={args.lam:g} (--lam)"
    prof = out / f"seed_{args.seed}" / "profile"
    k_ard = {**main["key"], "stage": "ard_profile", "weights": ARD_ONLY}
    stage(out / "ard_profile", k_ard, lambda d: ard_profile(ctx, prof, main["prompt_set"], d), **run)
    phi_ard, _ = load_phi(ctx, out / "ard_profile" / "phi.safetensors")
    middle = middle_layers(ctx.moe_layers, args.middle_layers or len(sel))
    seed_sel = {s: {**runs[s]["aals"], "fallback": bool(json.loads(
        (out / f"seed_{s}" / "layers" / "aals.json").read_text()).get("fallback", False))} for s in seeds}
    k_chk = {**k_tune, "stage": "checks", "lambda": lam, "middle": middle, "control_lambda": args.control_lambda,
             "ard_phi": file_sha(out / "ard_profile" / "phi.safetensors"),
             "seed_keys": {str(s): key_hash(runs[s]["key"]) for s in seeds}}
    res = stage(out / "checks", k_chk, lambda d: run_checks(ctx, main, phi_ard, lam, lam_label, middle, seed_sel, d),
                **run)
    say("checks (a)-(d) done")
    manifest = {"command": "robustness", "model": ctx.model_id, "revision": ctx.revision,
                "model_type": ctx.model_type, "seed": ctx.seed, "seeds": seeds,
                "sizes": dataclasses.asdict(ctx.sizes), "selected_layers": sel, "lambda_star": op["lambda_star"],
                "feasible": op["feasible"], "tune_reason": op["reason"], "lambda": lam, "lambda_label": lam_label,
                "middle_layers": middle, "n_star": res["n_star"], "seed_stability": res["seed_stability"],
                "engine": ctx.engine_mode, "versions": versions(),
                "stage_keys": {"tune": key_hash(k_tune), "ard_profile": key_hash(k_ard), "checks": key_hash(k_chk)}}
    write_report(out, manifest)
    write_json(out / "timings.json", {"total": round(time.perf_counter() - t0, 3)})
    print(f"FARE robustness report: {out / 'report' / 'robustness.md'} (layers {sel}, {lam_label})")
    return 0
