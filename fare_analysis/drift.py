"""Prompt-matched drift of runs from a baseline (SPEC section 12): what benchmark means can hide.

``fare drift BASE RUN... --out DIR`` pairs every run's items with the baseline's by ``doc_hash`` and
measures, per task (and per prompt category where the task has one):

* refusal tasks (items judged ``refused`` by the task's refusal judge): ``refusal_r2c`` =
  P(base refused, run complied), ``refusal_c2r`` = P(base complied, run refused), ``refusal_flip``
  = their sum; per XSTest label (safe/unsafe) and type, HarmBench semantic/functional category;
* BOLD: ``toxicity_change`` = mean per-prompt toxicity change (run - base) and ``toxicity_cross``
  = share of prompts crossing the 0.5 threshold in either direction, per domain;
* stereotype completion: ``stereotype_1to0`` / ``stereotype_0to1`` / ``stereotype_flip``;
* every generation task: ``exact_match`` (identical text), ``token_edit_distance`` (Levenshtein
  distance over whitespace tokens / the longer length, mean over prompts) and ``chrf`` (sacrebleu
  sentence chrF of the run's text against the base's, 0-100, mean over prompts);
* log-likelihood multiple-choice tasks (BBQ, TruthfulQA, CrowS-Pairs, StereoSet): ``answer_flip``
  = share of items whose chosen answer changed (highest logged log-likelihood, an exact tie kept as
  a tie; StereoSet by the task's own candidate scores; CrowS: the preferred sentence) and
  ``gold_abs_dloglik`` = mean |delta log-likelihood| of the gold choice; rolling/plain
  log-likelihood tasks: ``abs_dloglik``.

Every value is a mean over paired items with a percentile bootstrap 95% CI (1,000 resamples).

**Drift score** of a task = its flip rate: ``refusal_flip`` (refusal tasks), ``answer_flip``
(multiple choice), ``toxicity_cross`` (BOLD), ``stereotype_flip`` (stereotype completion); tasks
without a flip (perplexity) have none. Drift score of a run = mean over its scored tasks. A run
can have delta ~ 0 on every benchmark mean and a large drift score.

Writes ``drift.csv`` (one row per run x task x measure x category, plus ``drift_score`` rows),
``drift.md`` and ``drift_scores.png`` / ``drift_categories.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fare_core.errors import FareError
from fare_core.files import atomic_write

from .compare import check_pair, config_differences, refuse_overwrite, require_int
from .runs import Run, as_run, iter_samples, load_run, logged_verdict
from .stats import DEFAULT_BOOTSTRAP, bootstrap_ci

#: doc fields that split a task's items into prompt categories (matched by task-name prefix).
CATEGORY_FIELDS = {
    "fare_xstest": ("label", "type"),
    "fare_harmbench": ("semantic_category", "functional_category"),
    "fare_bold": ("domain",),
    "fare_stereo_completion": ("axis",),
    "fare_bbq": ("category", "context_condition"),
    "fare_crows_pairs": ("bias_type", "stereo_antistereo"),
    "fare_stereoset": ("bias_type",),
}
SCORE_MEASURES = ("refusal_flip", "answer_flip", "toxicity_cross", "stereotype_flip")
COLUMNS = ["run", "run_path", "task", "measure", "category", "n", "value", "ci_low", "ci_high"]
OUTPUTS = ("drift.csv", "drift.md", "drift_scores.png", "drift_categories.png")


@dataclass
class Drift:
    """Drift of ``run`` from ``base``: rows (task, measure, category, n, value, ci_low, ci_high) and
    scores ({task: flip rate, "run": mean over scored tasks})."""

    base: Run
    run: Run
    rows: list[dict] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------ per-item readings


def token_edit_distance(a: str, b: str) -> float:
    """Levenshtein distance between the whitespace tokens of a and b / the longer token count (0..1)."""
    ta, tb = a.split(), b.split()
    if not ta and not tb:
        return 0.0
    prev = list(range(len(tb) + 1))
    for i, x in enumerate(ta, 1):
        cur = [i]
        for j, y in enumerate(tb, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1] / max(len(ta), len(tb))


def chrf(hypothesis: str, reference: str) -> float:
    """sacrebleu sentence chrF (0-100) of the run's text against the base's; identical texts score 100."""
    if hypothesis == reference:
        return 100.0
    from sacrebleu.metrics import CHRF

    return float(CHRF().sentence_score(hypothesis, [reference]).score)


def _text(resps) -> str | None:
    while isinstance(resps, list) and resps:
        resps = resps[0]
    return resps if isinstance(resps, str) else None


def _loglikelihoods(filtered) -> list[float] | None:
    """Per-choice log-likelihoods of a multiple-choice item (lm-eval logs [ll, is_greedy] pairs)."""
    try:
        return [float(c[0]) if isinstance(c, list) else float(c) for c in filtered]
    except (TypeError, ValueError, IndexError):
        return None


def choose(task: str, doc: dict, lls: list[float]) -> tuple[int, ...]:
    """The answer the task scores: the choice(s) with the highest log-likelihood (an exact tie keeps
    every tied choice, so a tie is neither answer - CrowS counts a tie as no preference); StereoSet
    by its own candidate scores (per token or per byte: fare_tasks.stereoset.candidate_scores)."""
    if task.startswith("fare_stereoset") and isinstance(doc, dict) and "sentences" in doc:
        from fare_tasks.stereoset import candidate_scores

        lls = candidate_scores(doc, [(ll, False) for ll in lls])
    scores = np.asarray(lls, dtype=np.float64)
    return tuple(int(i) for i in np.flatnonzero(scores == scores.max()))


def categories(task: str, doc) -> list[str]:
    fields = next((f for prefix, f in CATEGORY_FIELDS.items() if task.startswith(prefix)), ())
    if not isinstance(doc, dict):
        return []
    return [f"{name}={doc[name]}" for name in fields if doc.get(name) not in (None, "")]


# ------------------------------------------------------------------------ drift of one task


def _read(run: Run, task: str) -> dict:
    out, first_filter = {}, None
    for rec in iter_samples(run, task):
        first_filter = first_filter or rec["filter"]
        if rec["filter"] == first_filter:
            out[rec["key"]] = rec
    return out


def _task_measures(task: str, output_type: str, a: dict, b: dict, keys: list[str]) -> tuple[dict, list[str]]:
    """{measure: [(categories, per-item value)]} for one task, and notes on items left out."""
    measures: dict[str, list] = {}
    notes = []

    def add(name, cats, value):
        measures.setdefault(name, []).append((cats, float(value)))

    skipped_judge = 0
    tox = None
    if output_type == "generate_until":
        from fare_tasks.toxicity import TOXIC_THRESHOLD as tox
    for k in keys:
        ra, rb = a[k], b[k]
        cats = categories(task, ra["doc"])
        if output_type == "multiple_choice":
            la, lb = _loglikelihoods(ra["filtered_resps"]), _loglikelihoods(rb["filtered_resps"])
            if not la or not lb or len(la) != len(lb):
                continue
            add("answer_flip", cats, choose(task, ra["doc"], la) != choose(task, rb["doc"], lb))
            gold = str(ra.get("target", ""))
            if gold.isdigit() and int(gold) < len(la):
                add("gold_abs_dloglik", cats, abs(lb[int(gold)] - la[int(gold)]))
        elif output_type in ("loglikelihood_rolling", "loglikelihood"):
            la, lb = _loglikelihoods(ra["filtered_resps"]), _loglikelihoods(rb["filtered_resps"])
            if la and lb:
                add("abs_dloglik", cats, abs(lb[0] - la[0]))
        elif output_type == "generate_until":
            ta, tb = _text(ra["resps"]), _text(rb["resps"])
            if ta is not None and tb is not None:
                add("exact_match", [], ta == tb)
                add("token_edit_distance", [], token_edit_distance(ta, tb))
                add("chrf", [], chrf(tb, ta))
            va, vb = logged_verdict(ra["filtered_resps"]), logged_verdict(rb["filtered_resps"])
            if "refused" in va or "refused" in vb:
                if va.get("refused") is None or vb.get("refused") is None:
                    skipped_judge += 1
                else:
                    ref_a, ref_b = bool(va["refused"]), bool(vb["refused"])
                    add("refusal_r2c", cats, ref_a and not ref_b)
                    add("refusal_c2r", cats, ref_b and not ref_a)
                    add("refusal_flip", cats, ref_a != ref_b)
            if "toxicity" in va and "toxicity" in vb:
                xa, xb = float(va["toxicity"]), float(vb["toxicity"])
                add("toxicity_change", cats, xb - xa)
                add("toxicity_cross", cats, (xa >= tox) != (xb >= tox))
            sa, sb = ra["values"].get("stereotyped"), rb["values"].get("stereotyped")
            if sa is not None and sb is not None:
                add("stereotype_1to0", cats, bool(sa) and not sb)
                add("stereotype_0to1", cats, bool(sb) and not sa)
                add("stereotype_flip", cats, bool(sa) != bool(sb))
    if skipped_judge:
        notes.append(f"{task}: {skipped_judge} paired items without a refusal verdict in one run (judge failed) left "
                     "out of the refusal flips")
    return measures, notes


def _summarise(task: str, measures: dict, *, seed: int, n_bootstrap: int) -> list[dict]:
    rows = []
    for measure, items in measures.items():
        groups: dict[str, list[float]] = {"all": [v for _, v in items]}
        for cats, v in items:
            for c in cats:
                groups.setdefault(c, []).append(v)
        for cat in ["all", *sorted(c for c in groups if c != "all")]:
            values = groups[cat]
            ci = bootstrap_ci(values, n_resamples=n_bootstrap, seed=seed)
            rows.append({"task": task, "measure": measure, "category": cat, "n": len(values),
                         "value": float(np.mean(values)), "ci_low": ci.low, "ci_high": ci.high})
    return rows


def drift_runs(base, run, *, seed: int = 0, n_bootstrap: int = DEFAULT_BOOTSTRAP, strict: bool = False,
               allow_other_model: bool = False, progress=None) -> Drift:
    """Drift of ``run`` from ``base`` on every shared task (see the module docstring)."""
    require_int(1, n_bootstrap=n_bootstrap)
    require_int(0, seed=seed)
    base, run = as_run(base), as_run(run)
    common = check_pair(base, run, allow_other_model=allow_other_model)
    out = Drift(base=base, run=run)
    alone = sorted(base.tasks.keys() ^ run.tasks.keys())
    if alone:
        out.warnings.append(f"{run.path}: tasks of one run only (no drift): {', '.join(alone)}")
    diffs = config_differences(base, run, common)
    if diffs:
        out.warnings.append(f"{run.path}: settings that change numbers differ from the base: " + "; ".join(diffs))
    for i, task in enumerate(common, 1):
        if progress:
            progress(f"drift: {run.label}: {task} ({i}/{len(common)})")
        a, b = _read(base, task), _read(run, task)
        keys = [k for k in a if k in b]
        if len(keys) < max(len(a), len(b)):
            msg = (f"{task}: {len(a) - len(keys)} items only in {base.path}, {len(b) - len(keys)} only in {run.path}")
            if strict:
                raise FareError(f"{msg}; --strict refuses (drop --strict to use the {len(keys)} shared items)")
            out.warnings.append(f"{msg}: drift on the {len(keys)} shared items")
        if not keys:
            continue
        cfg = base.task_configs.get(task) or run.task_configs.get(task) or {}
        measures, notes = _task_measures(task, cfg.get("output_type", ""), a, b, keys)
        out.warnings += notes
        rows = _summarise(task, measures, seed=seed, n_bootstrap=n_bootstrap)
        out.rows += rows
        for measure in SCORE_MEASURES:
            hit = next((r for r in rows if r["measure"] == measure and r["category"] == "all"), None)
            if hit:
                out.scores[task] = hit["value"]
                break
    if out.scores:
        out.scores["run"] = float(np.mean(list(out.scores.values())))
    return out


# ------------------------------------------------------------------------ output


def _fmt(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def to_markdown(drifts: list[Drift]) -> str:
    tasks = sorted({t for d in drifts for t in d.scores if t != "run"})
    lines = ["# Drift from the baseline", "", f"Baseline: {drifts[0].base.label} ({drifts[0].base.path})", "",
             ("Drift score = flip rate per task (refusal / answer / toxicity-threshold / stereotype flips, both "
              "directions); run = mean over tasks."), "",
             "| run | " + " | ".join(tasks) + " | run score |", "|---|" + "---|" * (len(tasks) + 1)]
    for d in drifts:
        lines.append(f"| {d.run.label} | " + " | ".join(_fmt(d.scores.get(t)) for t in tasks)
                     + f" | {_fmt(d.scores.get('run'))} |")
    for d in drifts:
        lines += ["", f"## {d.run.label} ({d.run.path})", "", "| task | measure | category | n | value | 95% CI |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['measure']} | {r['category']} | {r['n']} | {_fmt(r['value'])} | "
                  f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] |" for r in d.rows]
        if d.warnings:
            lines += ["", "Warnings:", ""] + [f"- {w}" for w in d.warnings]
    return "\n".join(lines) + "\n"


def csv_rows(drifts: list[Drift]) -> list[dict]:
    out = []
    for d in drifts:
        ident = {"run": d.run.label, "run_path": str(d.run.path)}
        out += [{**ident, **r} for r in d.rows]
        out += [{**ident, "task": t if t != "run" else "*", "measure": "drift_score", "category": "all", "value": v}
                for t, v in d.scores.items()]
    return out


def plot(drifts: list[Drift], out: Path) -> list[Path]:
    """drift_scores.png (task x run flip rates) and drift_categories.png (flip rate per category)."""
    from .plots import figure, save_png

    paths = []
    tasks = sorted({t for d in drifts for t in d.scores if t != "run"}) + ["run"]
    fig = figure(max(6, 1.2 * len(tasks) * max(1, len(drifts)) ** 0.5), 4)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(drifts))
    for i, d in enumerate(drifts):
        ax.bar(np.arange(len(tasks)) + i * width, [d.scores.get(t, np.nan) for t in tasks], width, label=d.run.label)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("drift score (flip rate)")
    ax.set_title(f"Drift from {drifts[0].base.label}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(atomic_write(out / "drift_scores.png", lambda tmp: save_png(fig, tmp)))

    cats = sorted({(r["task"], r["measure"], r["category"]) for d in drifts for r in d.rows
                   if r["measure"] in SCORE_MEASURES and r["category"] != "all"})
    fig = figure(7, max(2.5, 0.22 * len(cats) * max(1, len(drifts)) + 1))
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(drifts))
    for i, d in enumerate(drifts):
        got = {(r["task"], r["measure"], r["category"]): r for r in d.rows}
        vals = [got[c]["value"] if c in got else np.nan for c in cats]
        lo = [got[c]["value"] - got[c]["ci_low"] if c in got else 0 for c in cats]
        hi = [got[c]["ci_high"] - got[c]["value"] if c in got else 0 for c in cats]
        ax.barh(np.arange(len(cats)) + i * height, vals, height, xerr=[lo, hi], label=d.run.label)
    ax.set_yticks(np.arange(len(cats)) + 0.4 - height / 2, [f"{t} {c}" for t, _, c in cats], fontsize=6)
    ax.set_xlabel("flip rate with 95% CI")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(atomic_write(out / "drift_categories.png", lambda tmp: save_png(fig, tmp)))
    return paths


def write(drifts: list[Drift], out: Path) -> list[Path]:
    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(csv_rows(drifts))

    paths = [atomic_write(out / "drift.csv", write_csv),
             atomic_write(out / "drift.md", lambda tmp: tmp.write_text(to_markdown(drifts)))]
    return paths + plot(drifts, out)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fare drift", description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path, help="lm-eval --output_path of the baseline run (--log_samples)")
    ap.add_argument("runs", type=Path, nargs="+", help="lm-eval --output_path folders of the runs")
    ap.add_argument("--out", type=Path, required=True, help="folder for drift.csv, drift.md and the plots")
    ap.add_argument("--strict", action="store_true", help="refuse when an item is in one run only")
    ap.add_argument("--allow-other-model", action="store_true", help="accept runs of another model than the base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP)
    ap.add_argument("--overwrite", action="store_true", help="replace drift outputs already in --out")
    args = ap.parse_args(argv)
    require_int(1, **{"--bootstrap": args.bootstrap})
    require_int(0, **{"--seed": args.seed})
    refuse_overwrite(args.out, OUTPUTS, args.overwrite)
    base = load_run(args.base)
    runs = [load_run(p) for p in args.runs]  # every folder is checked before anything is computed
    for r in runs:
        check_pair(base, r, allow_other_model=args.allow_other_model)
    drifts = [drift_runs(base, r, seed=args.seed, n_bootstrap=args.bootstrap, strict=args.strict,
                         allow_other_model=args.allow_other_model,
                         progress=lambda msg: print(msg, file=sys.stderr, flush=True)) for r in runs]
    for d in drifts:
        for w in d.warnings:
            print(f"fare drift: warning: {w}", file=sys.stderr)
    for p in write(drifts, args.out):
        print(f"wrote {p}", file=sys.stderr)
    print(to_markdown(drifts).split("\n## ")[0])
    return 0
