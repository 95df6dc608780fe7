"""``fare leaderboard RUN... --baseline RUN [--baseline RUN ...] --out DIR``: many runs, one honest table.

Each run is compared item by item with the baseline of its own model identity (model, revision;
read from the run's records by :func:`fare_analysis.runs.load_run`, never from folder names):

* ``leaderboard.csv`` / ``.md`` / ``index.html``: one row per run (baselines included, marked),
  headline metrics as Δ vs the baseline with 95% CIs (:func:`fare_analysis.compare.compare_runs`),
  Benjamini-Hochberg adjusted across the whole table (:func:`fare_analysis.stats.bh_family`),
  drift scores (:func:`fare_analysis.drift.drift_runs`, SPEC 12) and two ranks:
  ``rank_shift`` orders runs by their shift score, the mean over headline metrics of
  |Δ| / CI half-width (1 = closest to its baseline), ``rank_drift`` by the run's drift score;
* ``instability.csv`` (per metric) and ``instability_summary.csv`` (per setting), with ``.md``: per
  model x method x setting run at two or more p, the spread of Δ over the safety proportion p
  (:mod:`fare_analysis.instability`, SPEC 12);
* ``comparisons.csv``: every compared metric of every run (long form; BH across that table) and
  ``not_compared.csv``: every metric left out, with the reason (with ``metrics=`` / ``--metrics``
  only those metrics are compared, so both files hold only them);
* PNGs: ``delta_vs_p.png``, ``delta_vs_drift.png``, ``heatmap.png`` (all embedded in index.html);
* from ``fare run`` folders: FARE's cross-model Tables 1, 3, 5, 6 and Fig. 3 under ``fare/``.

Runs are processed one at a time (samples are streamed by the comparison and dropped), so memory
grows only with the result table. The output is built in ``.<out>.partial`` and renamed into
place; an existing one is replaced only with ``overwrite=True`` (``--overwrite``). Each run's
comparison is cached (``cache/<key>.json``, key = both runs' files and the options) as soon as it
is done, so a killed build resumes and an extended table compares only its new runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fare_core.errors import FareError
from fare_core.files import atomic_write

from . import html, plots
from .compare import compare_runs, require_int
from .drift import drift_runs
from .fare_tables import build_fare_tables, write_table
from .instability import instability_tables
from .runs import IDENTITY_KEYS, Run, load_run, make_label
from .stats import DEFAULT_BOOTSTRAP, DEFAULT_PERMUTATIONS, bh_family

#: Headline metrics per task (all others stay in comparisons.csv); tasks not listed show the
#: first two metrics of their lm-eval metric_list.
HEADLINE = {
    "fare_crows_pairs": ("stereotype_preference", "parity_gap"),
    "fare_bbq": ("acc", "bias_ambig", "bias_disambig"),
    "fare_bbq_1k": ("acc", "bias_ambig", "bias_disambig"),
    "fare_xstest": ("over_refusal", "unsafe_refusal"),
    "fare_advbench_refusal": ("refused",),
    "fare_harmbench_refusal": ("refused",),
    "fare_bold_toxicity": ("toxicity", "toxic"),
    "fare_stereo_completion": ("stereotyped",),
    "fare_stereoset": ("ss", "lms", "icat"),
    "fare_truthfulqa": ("acc",),
    "fare_perplexity": ("word_perplexity",),
}
MARKER = "leaderboard.json"
CACHE = "cache"  # per-run comparison results (JSON, keyed by cache_key) for resuming
CACHE_FORMAT = 1


@dataclass
class Entry:
    """One leaderboard row: a run, its baseline, and (after comparison) its cells."""

    run: Run
    baseline: Run | None  # None for a baseline row
    cells: dict[str, dict] = field(default_factory=dict)  # "task/metric" -> comparison row
    drift: dict[str, float] = field(default_factory=dict)  # task (and "run") -> drift score
    warnings: list[str] = field(default_factory=list)
    not_compared: list[dict] = field(default_factory=list)
    cache_key: str = ""

    @property
    def role(self) -> str:
        return "baseline" if self.baseline is None else "run"


# ------------------------------------------------------------------------------- inputs


def _model_key(run: Run) -> tuple:
    return run.identity.get("model"), run.identity.get("revision")


def _identity_key(run: Run) -> str:
    return json.dumps({k: run.identity.get(k) for k in IDENTITY_KEYS}, sort_keys=True, default=str)


def _describe_model(key: tuple) -> str:
    return key[0] + (f"@{key[1]}" if key[1] not in (None, "", "main") else "")


def plan(runs: Sequence, baselines: Sequence) -> tuple[list[Entry], list[Path]]:
    """Load every folder, match each run with its model's baseline and validate, before any compute.

    Returns the leaderboard entries (baselines first) and the ``fare run`` folders.
    """
    base_runs: dict[tuple, Run] = {}
    shared: dict[str, dict] = {}

    def load(path) -> Run:
        """The run's records without what the table never reads (lm-eval's reported aggregates), and
        task configs shared between runs that logged identical ones: per-run memory stays small."""
        run = load_run(path)
        run.results = {}
        for task, cfg in run.task_configs.items():
            run.task_configs[task] = shared.setdefault(json.dumps(cfg, sort_keys=True, default=str), cfg)
        return run

    for b in baselines:
        run = load(b)
        if run.kind != "lm-eval":
            raise FareError(f"{run.path}: a fare run folder cannot be a --baseline; pass the dense model's lm-eval "
                            "--output_path (run with --log_samples)")
        key = _model_key(run)
        if key in base_runs and base_runs[key].path.resolve() != run.path.resolve():
            raise FareError(f"{run.path}: second --baseline for model {_describe_model(key)} (first: "
                            f"{base_runs[key].path}); pass one baseline per model")
        base_runs[key] = run
    entries = [Entry(b, None) for b in base_runs.values()]
    for e in entries:
        ident = e.run.identity
        if ident.get("method") not in (None, "none") or ident.get("intervention") not in (None, "none"):
            e.warnings.append(f"baseline {e.run.path} is not the dense model (method {ident.get('method')}, "
                              f"intervention {ident.get('intervention')}); its runs are compared with it all the same")
    seen_paths = {b.path.resolve() for b in base_runs.values()}
    seen_ids: dict[str, Run] = {_identity_key(b): b for b in base_runs.values()}
    fare_runs: list[Path] = []
    for r in runs:
        if Path(r).resolve() in seen_paths:
            continue
        run = load(r)
        seen_paths.add(run.path.resolve())
        if run.kind == "fare-run":
            fare_runs.append(run.path)
            continue
        key = _model_key(run)
        if key not in base_runs:
            given = ", ".join(f"{_describe_model(k)} ({b.path})" for k, b in base_runs.items()) or "none"
            raise FareError(f"{run.path}: no --baseline for model {_describe_model(key)} (baselines given: {given}); "
                            f"add --baseline <the dense {key[0]} lm-eval run with --log_samples>")
        base = base_runs[key]
        if not set(run.tasks) & set(base.tasks):
            raise FareError(f"{run.path}: no task in common with its baseline {base.path} "
                            f"({', '.join(sorted(run.tasks))} vs {', '.join(sorted(base.tasks))}); "
                            "evaluate the same tasks in both runs")
        ident = _identity_key(run)
        other = seen_ids.get(ident)
        if other is not None and set(other.tasks) & set(run.tasks):
            raise FareError(f"{run.path}: same model, method, p and intervention as {other.path} "
                            f"({run.label}) on the same tasks; pass one of them")
        seen_ids[ident] = run
        entries.append(Entry(run, base))
    if not any(e.role == "run" for e in entries) and not fare_runs:
        raise FareError("nothing to rank: pass at least one run besides the --baseline folders "
                        "(lm-eval --output_path folders with --log_samples, or fare run folders)")
    return entries, fare_runs


def headline_metrics(entries: Sequence[Entry], requested: Sequence[str] | None = None) -> list[str]:
    """The ``task/metric`` columns: ``requested`` (checked against the runs) or the defaults."""
    configs: dict[str, dict] = {}
    for e in entries:
        for task in e.run.tasks:
            configs.setdefault(task, e.run.task_configs.get(task, {}))
    available = {t: [m["metric"] for m in c.get("metric_list", []) if "metric" in m] for t, c in configs.items()}
    if requested:
        out = []
        for item in requested:
            task, _, metric = item.partition("/")
            if task not in available or metric not in available[task]:
                allowed = ", ".join(f"{t}/{m}" for t in sorted(available) for m in available[t][:4])
                raise FareError(f"--metrics {item!r}: not a metric of the runs' tasks; e.g. {allowed}, ...")
            out.append(item)
        return out
    out = []
    for task in sorted(available):
        wanted = HEADLINE.get(task) or tuple(available[task][:2])
        out += [f"{task}/{m}" for m in wanted if m in available[task]]
    return out


def _higher_is_better(entries: Sequence[Entry]) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {}
    for e in entries:
        for task, cfg in e.run.task_configs.items():
            for m in cfg.get("metric_list", []):
                if "metric" in m:
                    out.setdefault(f"{task}/{m['metric']}", m.get("higher_is_better"))
    return out


# ------------------------------------------------------------------------------- compute


def _compare(base: Run, run: Run, **kw) -> tuple[list[dict], list[dict], list[str]]:
    """``fare compare`` of one run against its baseline: (rows, not_compared, warnings)."""
    result = compare_runs(base, run, **kw)
    return list(result.rows), list(result.not_compared), list(result.warnings)


def _drift_scores(base: Run, run: Run, seed: int, n_bootstrap: int) -> tuple[dict[str, float], list[str]]:
    """``fare drift`` scores of one run ({task: flip rate, "run": mean}) and its warnings."""
    d = drift_runs(base, run, seed=seed, n_bootstrap=n_bootstrap)
    return {k: float(v) for k, v in d.scores.items()}, list(d.warnings)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _file_stamp(run: Run) -> list:
    files = sorted({*run.results_files, *run.tasks.values()})
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def cache_key(e: Entry, opts: dict) -> str:
    """Content key of one run's comparison: both runs' files (path, size, mtime) and the options."""
    blob = json.dumps({"format": CACHE_FORMAT, "base": _file_stamp(e.baseline), "run": _file_stamp(e.run),
                       "opts": opts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def compute(entries: Sequence[Entry], *, seed: int, n_permutations: int, n_bootstrap: int, drift: bool,
            n_agg_permutations: int | None = None, n_jobs: int = 1, log: Callable[[str], None] = _progress,
            cache_in: Sequence[Path] = (), cache_out: Path | None = None,
            metrics: Sequence[str] | None = None) -> list[dict]:
    """Compare (and drift-score) every run against its baseline, one at a time; returns all rows.

    ``metrics`` (``task/metric`` names) restricts the comparisons to those metrics (the columns a
    user asked for); None compares every metric (comparisons.csv then holds them all).

    Each run's result is stored as ``cache_out/<key>.json`` as soon as it is done; a result found in
    ``cache_in`` under the same key (same files, same options) is reused, so an interrupted or
    extended leaderboard resumes where it stopped.
    """
    todo = [e for e in entries if e.role == "run"]
    long_rows: list[dict] = []
    extra = {} if n_agg_permutations is None else {"n_agg_permutations": n_agg_permutations}
    if metrics is not None:
        extra["metrics"] = sorted(metrics)
    opts = {"seed": seed, "n_permutations": n_permutations, "n_bootstrap": n_bootstrap, "drift": drift, **extra}
    t0 = time.monotonic()
    for i, e in enumerate(todo, 1):
        key = e.cache_key = cache_key(e, opts)
        hit = next((d / f"{key}.json" for d in cache_in if (d / f"{key}.json").is_file()), None)
        if hit is not None:
            done = json.loads(hit.read_text())
        else:
            rows, not_compared, warnings = _compare(e.baseline, e.run, seed=seed, n_permutations=n_permutations,
                                                    n_bootstrap=n_bootstrap, n_jobs=n_jobs, **extra)
            scores = {}
            if drift:
                scores, warns = _drift_scores(e.baseline, e.run, seed, n_bootstrap)
                # fare compare already reported differing settings and unpaired items; keep drift's own notes
                warnings += [w for w in warns if w not in warnings
                             and "settings that change numbers" not in w and " only in " not in w]
            done = {"rows": rows, "not_compared": not_compared, "warnings": warnings, "drift": scores}
        if cache_out is not None:
            text = json.dumps(done, default=str)
            atomic_write(cache_out / f"{key}.json", lambda t, text=text: t.write_text(text))
        e.not_compared, e.warnings, e.drift = done["not_compared"], done["warnings"], done["drift"]
        for r in done["rows"]:
            e.cells[f"{r['task']}/{r['metric']}"] = r
            long_rows.append({"run": e.run.label, "path": str(e.run.path), "baseline": str(e.baseline.path),
                              **{k: v for k, v in r.items() if k not in ("pvalue_bh", "bh_family_size")}})
        elapsed = time.monotonic() - t0
        log(f"leaderboard: [{i}/{len(todo)}] {e.run.label} ({e.run.path}) {'cached' if hit else 'done'}, "
            f"{elapsed:.1f} s elapsed, ~{elapsed / i * (len(todo) - i):.0f} s left")
    return long_rows


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def adjust(entries: Sequence[Entry], metrics: Sequence[str]) -> int:
    """BH-adjust the headline cells of the whole table as one family; returns its size."""
    cells = [e.cells[m] for e in entries for m in metrics if m in e.cells and _finite(e.cells[m].get("pvalue"))]
    for cell, adj in zip(cells, bh_family(cells) if cells else []):
        cell["pvalue_bh"] = adj["pvalue_bh"]
    for e in entries:
        for m in metrics:
            if m in e.cells and not _finite(e.cells[m].get("pvalue")):
                e.cells[m]["pvalue_bh"] = math.nan
    return len(cells)


def _half_width(cell: dict) -> float:
    lo, hi = cell.get("ci_low"), cell.get("ci_high")
    return (hi - lo) / 2 if _finite(lo) and _finite(hi) else math.nan


def shift_score(e: Entry, metrics: Sequence[str]) -> float:
    """Mean over headline metrics of |Δ| / CI half-width (NaN when no metric has a usable CI)."""
    z = []
    for m in metrics:
        c = e.cells.get(m)
        if c and _finite(c.get("delta")):
            hw = _half_width(c)
            if _finite(hw) and hw > 0:
                z.append(abs(c["delta"]) / hw)
            elif c["delta"] == 0:
                z.append(0.0)
    return float(sum(z) / len(z)) if z else math.nan


def _ranks(values: Sequence[float]) -> list[int | None]:
    """1 = smallest; ties share the lower rank; NaN gets no rank."""
    order = sorted((v, i) for i, v in enumerate(values) if _finite(v))
    ranks: list[int | None] = [None] * len(values)
    for pos, (v, i) in enumerate(order):
        ranks[i] = next(p for p, (w, _) in enumerate(order) if w == v) + 1
    return ranks


def _setting(identity: dict) -> str:
    params = identity.get("method_params") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(params.items()) if k not in ("p", "calib_p")) or ""


def _group(identity: dict) -> str:
    """Model x method x setting (the identity label without p)."""
    return make_label({**identity, "p": None})


def table_rows(entries: Sequence[Entry], metrics: Sequence[str], drift_tasks: Sequence[str]) -> list[dict]:
    """Flat leaderboard rows (the CSV), with ranks."""
    rows = []
    for e in entries:
        ident = e.run.identity
        row = {"run": e.run.label, "role": e.role, "model": ident.get("model"), "revision": ident.get("revision"),
               "method": ident.get("method"), "setting": _setting(ident), "p": ident.get("p"),
               "intervention": ident.get("intervention"), "lam": ident.get("lam"),
               "baseline": e.baseline.label if e.baseline else "", "path": str(e.run.path)}
        for m in metrics:
            c = e.cells.get(m, {})
            for k in ("delta", "ci_low", "ci_high", "pvalue", "pvalue_bh", "n"):
                row[f"{m}:{k}"] = c.get(k)
        for t in drift_tasks:
            row[f"drift:{t}"] = e.drift.get(t)
        row["shift_score"] = shift_score(e, metrics) if e.role == "run" else None
        rows.append(row)
    for key, rank in (("shift_score", "rank_shift"), ("drift:run", "rank_drift")):
        vals = [r.get(key) if r["role"] == "run" and r.get(key) is not None else math.nan for r in rows]
        for r, k in zip(rows, _ranks(vals)):
            r[rank] = k
    return rows


def _cells_for_instability(entries: Sequence[Entry], metrics: Sequence[str]) -> list[dict]:
    out = []
    for e in entries:
        if e.role != "run":
            continue
        ident = e.run.identity
        for m in metrics:
            c = e.cells.get(m)
            if c:
                out.append({"group": _group(ident), "model": ident.get("model"), "method": ident.get("method"),
                            "setting": _setting(ident), "p": ident.get("p"), "metric": m, "delta": c.get("delta"),
                            "ci_low": c.get("ci_low"), "ci_high": c.get("ci_high")})
    return out


# ------------------------------------------------------------------------------- writing


def _fmt(x, digits=3) -> str:
    return f"{x:+.{digits}f}" if _finite(x) else ""


def _md_cell(row: dict, m: str) -> str:
    d = row.get(f"{m}:delta")
    if not _finite(d):
        return ""
    star = "*" if _finite(row.get(f"{m}:pvalue_bh")) and row[f"{m}:pvalue_bh"] < 0.05 else ""
    return f"{_fmt(d)}{star} [{_fmt(row.get(f'{m}:ci_low'))}, {_fmt(row.get(f'{m}:ci_high'))}]"


def _write_markdown(path: Path, rows, metrics, drift_tasks, inst_summary, entries, family_size) -> None:
    cols = ["run", "role", "p"] + list(metrics) + [f"drift:{t}" for t in drift_tasks] + ["rank_shift", "rank_drift"]
    legend = (f"Δ vs each model's baseline [95% bootstrap CI]; * = BH-adjusted p < 0.05 over the table's "
              f"{family_size} tests. Drift = flip rate (SPEC 12). rank_shift: mean |Δ|/CI half-width, 1 = closest "
              "to baseline; rank_drift: 1 = least drift.")
    lines = ["# Leaderboard", "", legend, "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        vals = []
        for c in cols:
            if c in metrics:
                vals.append(_md_cell(r, c))
            elif c.startswith("drift:"):
                vals.append(f"{r[c]:.3f}" if _finite(r.get(c)) else "")
            else:
                v = r.get(c)
                vals.append("" if v is None else (f"{v:g}" if isinstance(v, float) else str(v).replace("|", "\\|")))
        lines.append("| " + " | ".join(vals) + " |")
    if inst_summary:
        lines += ["", "## Instability across p (SPEC 12)", "",
                  "| setting | p values | metrics | mean range | mean sd | max abs Δ | instability (range / CI half-width) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {s['group']} | {', '.join(f'{p:g}' for p in s['p_values'])} | {s['n_metrics']} | "
                  f"{s['mean_range']:.4f} | {s['mean_sd']:.4f} | {s['max_abs_delta']:.4f} | {s['instability']:.3f} |"
                  for s in inst_summary]
    notes = [(e.run.label, w) for e in entries for w in e.warnings]
    dropped = [(e.run.label, n) for e in entries for n in e.not_compared]
    if notes:
        lines += ["", "## Warnings", ""] + [f"- {label}: {w}" for label, w in notes]
    if dropped:
        head = [(label, n) for label, n in dropped if f"{n.get('task')}/{n.get('metric')}" in metrics
                or n.get("metric") == "*"]
        lines += ["", "## Not compared", ""] + [
            f"- {label}: {n.get('task')}/{n.get('metric')}, because {n.get('reason')}" for label, n in head]
        if len(dropped) > len(head):
            lines.append(f"- {len(dropped) - len(head)} other (run, metric) pairs outside the headline columns: "
                         "see not_compared.csv")
    atomic_write(path, lambda t: t.write_text("\n".join(lines) + "\n"))


def _html_tables(rows, metrics, drift_tasks, hib, inst_metric, inst_summary, fare_paths) -> list[html.Table]:
    cols = [html.Column("run"), html.Column("role"), html.Column("method"), html.Column("setting"),
            html.Column("p", "number")]
    cols += [html.Column(m, "number", f"Δ {m} vs baseline; hover a cell for its 95% CI and p-values") for m in metrics]
    cols += [html.Column(f"drift {t}", "number", "flip rate vs baseline (SPEC 12)") for t in drift_tasks]
    cols += [html.Column("shift score", "number", "mean |Δ| / CI half-width"),
             html.Column("rank shift", "number"), html.Column("rank drift", "number")]
    scale = {m: max([abs(r[f"{m}:delta"]) for r in rows if _finite(r.get(f"{m}:delta"))] or [0.0]) for m in metrics}
    dscale = {t: max([r[f"drift:{t}"] for r in rows if _finite(r.get(f"drift:{t}"))] or [0.0]) for t in drift_tasks}
    body = []
    for r in rows:
        cells = [html.Cell(r["run"], r["run"], r["path"]), html.Cell(r["role"], r["role"]),
                 html.Cell(str(r["method"] or ""), r["method"] or ""), html.Cell(r["setting"], r["setting"]),
                 html.number_cell(r["p"], digits=2)]
        for m in metrics:
            d = r.get(f"{m}:delta")
            title = ""
            if _finite(d):
                title = (f"Δ = {d:+.4f}, 95% CI [{_fmt(r.get(f'{m}:ci_low'), 4)}, {_fmt(r.get(f'{m}:ci_high'), 4)}], "
                         f"p = {r.get(f'{m}:pvalue')}, p_BH = {r.get(f'{m}:pvalue_bh')}, n = {r.get(f'{m}:n')}")
            sig = _finite(r.get(f"{m}:pvalue_bh")) and r[f"{m}:pvalue_bh"] < 0.05
            cells.append(html.number_cell(d, digits=3, title=title, cls="num sig" if sig else "num",
                                          color=html.diverging_colour(d, scale[m], hib.get(m))))
        for t in drift_tasks:
            v = r.get(f"drift:{t}")
            cells.append(html.number_cell(v, cls="num", color=html.sequential_colour(v, dscale[t])))
        cells += [html.number_cell(r["shift_score"], cls="num"), html.number_cell(r["rank_shift"], cls="num"),
                  html.number_cell(r["rank_drift"], cls="num")]
        body.append(cells)
    tables = [html.Table("leaderboard", "Leaderboard", cols, body,
                         "Δ vs the baseline of the same model; bold = BH-adjusted p < 0.05 over the table; blue = "
                         "better, red = worse than the baseline (by the metric's direction); click a header to sort.")]
    if inst_summary:
        icols = [html.Column("setting"), html.Column("p values"), html.Column("metrics", "number"),
                 html.Column("mean range", "number"), html.Column("mean sd", "number"),
                 html.Column("max |Δ|", "number"), html.Column("instability", "number",
                                                                 "mean over metrics of range / pooled CI half-width")]
        top = max([s["instability"] for s in inst_summary if _finite(s["instability"])] or [0.0])
        ibody = [[html.Cell(s["group"], s["group"]), html.Cell(", ".join(f"{p:g}" for p in s["p_values"]), s["n_p"]),
                  html.number_cell(s["n_metrics"]), html.number_cell(s["mean_range"], digits=4),
                  html.number_cell(s["mean_sd"], digits=4), html.number_cell(s["max_abs_delta"], digits=4),
                  html.number_cell(s["instability"], color=html.sequential_colour(s["instability"], top))]
                 for s in inst_summary]
        tables.append(html.Table("instability", "Instability across p (SPEC 12)", icols, ibody,
                                 "Per model x method x setting run at two or more p values; raw spread and the "
                                 "spread in units of the pooled CI half-width. Per metric: instability.csv."))
    for stem, path in fare_paths.items():
        if path.suffix == ".csv":
            tables.append(_csv_table(stem, path))
    return tables


def _csv_table(stem: str, path: Path) -> html.Table:
    import csv

    with open(path, newline="") as fh:
        data = list(csv.reader(fh))
    head, body = data[0], data[1:]

    def cell(v: str) -> html.Cell:
        try:
            x = float(v)
        except ValueError:
            return html.Cell(v, v)
        return html.Cell(v if len(v) < 9 else f"{x:.4g}", repr(x), cls="num")

    numeric = [all(_is_num(r[i]) for r in body if r[i] != "") for i in range(len(head))]
    return html.Table(stem, stem.replace("_", " "), [html.Column(h, "number" if n else "text") for h, n in
                                                     zip(head, numeric)], [[cell(v) for v in r] for r in body])


def _is_num(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _plots(d: Path, entries, metrics, rows, inst_cells) -> dict[str, Path]:
    out = {}
    p_points = [{"group": c["group"], "metric": c["metric"], "p": c["p"], "delta": c["delta"],
                 "ci_low": c["ci_low"], "ci_high": c["ci_high"]} for c in inst_cells]
    out["delta_vs_p"] = plots.delta_vs_p(p_points, metrics, d / "delta_vs_p.png")
    drift_pts = [{"metric": m, "drift": r.get("drift:run"), "delta": r.get(f"{m}:delta")}
                 for r in rows if r["role"] == "run" for m in metrics
                 if _finite(r.get("drift:run")) and _finite(r.get(f"{m}:delta"))]
    out["delta_vs_drift"] = plots.delta_vs_drift(drift_pts, d / "delta_vs_drift.png")
    groups = sorted({c["group"] for c in _cells_for_instability(entries, metrics)} |
                    {_group(e.run.identity) for e in entries if e.role == "run"})
    vals, labels = [], []
    for g in groups:
        vrow, lrow = [], []
        for m in metrics:
            cs = [e.cells[m] for e in entries if e.role == "run" and _group(e.run.identity) == g and m in e.cells
                  and _finite(e.cells[m].get("delta"))]
            z = [c["delta"] / _half_width(c) for c in cs if _finite(_half_width(c)) and _half_width(c) > 0]
            vrow.append(sum(z) / len(z) if z else math.nan)
            lrow.append(f"{sum(c['delta'] for c in cs) / len(cs):+.3f}" if cs else "")
        vals.append(vrow)
        labels.append(lrow)
    if groups and metrics:
        out["heatmap"] = plots.heatmap(groups, metrics, vals, labels, d / "heatmap.png",
                                       title="Methods x metrics: colour = mean Δ/CI half-width, text = mean Δ")
    return out


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """The work folder ``.<out>.partial`` next to ``out``; a killed build's one is kept for its cache."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FareError(f"--out {out}: exists and is not empty; pass --overwrite to replace it or choose a new folder")
        if not (out / MARKER).is_file():
            raise FareError(f"--out {out}: not a leaderboard folder (no {MARKER}); refusing to replace it even with "
                            "--overwrite; choose a new folder")
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.is_dir():
        for child in tmp.iterdir():
            if child.name != CACHE:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    (tmp / CACHE).mkdir(parents=True, exist_ok=True)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def build_leaderboard(runs: Sequence, baselines: Sequence, out, *, metrics: Sequence[str] | None = None,
                      seed: int = 0, n_permutations: int = DEFAULT_PERMUTATIONS, n_bootstrap: int = DEFAULT_BOOTSTRAP,
                      n_agg_permutations: int | None = None, n_jobs: int = 1, drift: bool = True,
                      overwrite: bool = False,
                      title: str = "fare leaderboard",
                      log: Callable[[str], None] = _progress) -> dict[str, Path]:
    """Build the leaderboard of ``runs`` against ``baselines`` (one per model) into ``out``.

    ``metrics``: the headline ``task/metric`` columns (default: :data:`HEADLINE` per task, every
    metric still compared for comparisons.csv); when given, only these metrics are compared.
    Returns ``{name: path}`` of every file written (leaderboard_csv, leaderboard_md, index_html,
    instability_csv, comparisons_csv, the plots and FARE tables).
    """
    counts = {"n_permutations": n_permutations, "n_bootstrap": n_bootstrap, "n_jobs": n_jobs}
    require_int(1, **counts, **({} if n_agg_permutations is None else {"n_agg_permutations": n_agg_permutations}))
    require_int(0, seed=seed)
    out = Path(out)
    entries, fare_runs = plan(runs, baselines)
    cols = headline_metrics(entries, metrics) if any(e.role == "run" for e in entries) else []
    tmp = _prepare_out(out, overwrite)
    try:
        long_rows = compute(entries, seed=seed, n_permutations=n_permutations, n_bootstrap=n_bootstrap,
                            drift=drift, n_agg_permutations=n_agg_permutations, n_jobs=n_jobs, log=log,
                            cache_in=[tmp / CACHE, out / CACHE], cache_out=tmp / CACHE,
                            metrics=cols if metrics else None)
        used = {f"{e.cache_key}.json" for e in entries}
        for stale in (tmp / CACHE).iterdir():  # keep only the entries of this table's runs
            if stale.name not in used:
                stale.unlink()
        family = adjust(entries, cols)
        drift_tasks = sorted({t for e in entries for t in e.drift if t != "run"})
        drift_tasks += ["run"] if any("run" in e.drift for e in entries) else []
        rows = table_rows(entries, cols, drift_tasks)
        inst_cells = _cells_for_instability(entries, cols)
        inst_metric, inst_summary = instability_tables(inst_cells, cols)
        paths: dict[str, Path] = {}
        if any(e.role == "run" for e in entries):
            paths["leaderboard_csv"] = write_table(rows, tmp / "leaderboard", list(rows[0]))[0]
            _write_markdown(tmp / "leaderboard.md", rows, cols, drift_tasks, inst_summary, entries, family)
            paths["leaderboard_md"] = tmp / "leaderboard.md"
            if inst_metric:
                paths["instability_csv"] = write_table(inst_metric, tmp / "instability", title="Instability per metric")[0]
                write_table(inst_summary, tmp / "instability_summary", title="Instability per setting")
            long_rows = bh_family(long_rows) if long_rows else long_rows
            if long_rows:
                paths["comparisons_csv"] = write_table(long_rows, tmp / "comparisons", markdown=False)[0]
            dropped = [{"run": e.run.label, "path": str(e.run.path), **n} for e in entries for n in e.not_compared]
            if dropped:
                paths["not_compared_csv"] = write_table(dropped, tmp / "not_compared",
                                                        ["run", "path", "task", "metric", "reason"], markdown=False)[0]
            paths.update(_plots(tmp, entries, cols, rows, inst_cells))
        fare_paths = build_fare_tables(fare_runs, tmp / "fare") if fare_runs else {}
        paths.update({f"fare/{k}": v for k, v in fare_paths.items()})
        figures = [html.Figure(p, caption) for key, caption in (
            ("delta_vs_p", "Metric Δ vs p per method, 95% CI bars"), ("delta_vs_drift", "Benchmark Δ vs drift score"),
            ("heatmap", "Methods x metrics heatmap"), ("fare/fig3_aals_ratio", "FARE Fig. 3: AALS R(l), all models"))
            if (p := paths.get(key)) is not None]
        note = (f"{sum(e.role == 'run' for e in entries)} runs against {sum(e.role == 'baseline' for e in entries)} "
                f"baseline(s); {len(fare_runs)} fare run folder(s). Paired on doc_hash; 95% bootstrap CIs "
                f"({n_bootstrap} resamples), paired permutation p-values ({n_permutations}), seed {seed}; BH over "
                f"{family} headline tests.")
        page = html.render(title, note, _html_tables(rows, cols, drift_tasks, _higher_is_better(entries), inst_metric,
                                                     inst_summary, fare_paths), figures)
        paths["index_html"] = atomic_write(tmp / "index.html", lambda t: t.write_text(page, encoding="utf-8"))
        manifest = {"format": "fare-leaderboard/1", "runs": [str(e.run.path) for e in entries if e.role == "run"],
                    "baselines": [str(e.run.path) for e in entries if e.role == "baseline"],
                    "fare_runs": [str(p) for p in fare_runs], "metrics": cols, "seed": seed,
                    "n_permutations": n_permutations, "n_bootstrap": n_bootstrap,
                    "n_agg_permutations": n_agg_permutations, "drift": drift,
                    "files": sorted(str(p.relative_to(tmp)) for p in paths.values() if p is not None)}
        atomic_write(tmp / MARKER, lambda t: t.write_text(json.dumps(manifest, indent=2) + "\n"))
        _publish(tmp, out)
    except FareError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {k: out / p.relative_to(tmp) for k, p in paths.items() if p is not None}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fare leaderboard", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="lm-eval --output_path folders (with --log_samples) or fare run folders")
    ap.add_argument("--baseline", action="append", type=Path, default=[],
                    help="dense baseline run of a model (repeat: one per model)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (must be new or empty)")
    ap.add_argument("--metrics", default=None, help="comma-separated task/metric headline columns (default: per task); only these are "
                    "compared (faster; comparisons.csv then holds only them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--permutations", type=int, default=DEFAULT_PERMUTATIONS)
    ap.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP)
    ap.add_argument("--agg-permutations", type=int, default=None,
                    help="label-swap permutations for aggregate metrics (default: fare compare's)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes for the aggregate metrics of a comparison")
    ap.add_argument("--no-drift", action="store_true", help="skip the drift columns")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing leaderboard folder")
    ap.add_argument("--title", default="fare leaderboard")
    args = ap.parse_args(argv)
    require_int(1, **{f"--{flag.replace('_', '-')}": getattr(args, flag) for flag in ("permutations", "bootstrap", "jobs")},
                **({} if args.agg_permutations is None else {"--agg-permutations": args.agg_permutations}))
    require_int(0, **{"--seed": args.seed})
    paths = build_leaderboard(args.runs, args.baseline, args.out,
                              metrics=[m for m in (args.metrics or "").split(",") if m] or None, seed=args.seed,
                              n_permutations=args.permutations, n_bootstrap=args.bootstrap,
                              n_agg_permutations=args.agg_permutations, n_jobs=args.jobs, drift=not args.no_drift,
                              overwrite=args.overwrite, title=args.title)
    print(f"leaderboard: {paths.get('index_html', args.out)} ({len(paths)} files)")
    return 0
