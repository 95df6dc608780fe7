"""Paired comparison of every metric of two runs from their ``--log_samples`` files (SPEC section 12).

``fare compare BASE RUN [--strict] [--out DIR]`` pairs the two runs' items by ``doc_hash`` and,
for every metric of every task both runs logged:

* ``mean`` metrics (lm-eval aggregation ``mean``): mean of per-item differences RUN - BASE, paired
  bootstrap 95% CI (1,000 resamples) and paired sign-flip permutation p-value (10,000);
* ``partial`` metrics - means logged on only some items (XSTest ``over_refusal`` / ``refusal_<type>``,
  HarmBench and BOLD categories, items whose judge returned None): the same, on the items where
  both runs logged a value;
* ``aggregate`` metrics (CrowS parity gap / pref_*, BBQ s_DIS / s_AMB overall and per category,
  StereoSet ss / lms / ICAT, perplexities): the task's own aggregation function (resolved through
  the installed lm-eval task config) recomputed on bootstrap resamples of paired items (CI) and on
  label-swapped paired items (permutation p-value, 1,000 by default: each resample calls the
  function twice, so BBQ's 44 aggregates on 1,000 items take minutes; lower ``--bootstrap`` /
  ``--agg-permutations`` for a quick look).

Benjamini-Hochberg adjusted p-values across the table. Items of one run only give a warning with
the counts (``--strict`` refuses); settings that change numbers (batch size, dtype, max length, chat
template, fewshot, limit, judge, ...) give one warning naming each differing key; every metric that
could not be compared is listed with the reason. Writes ``comparison.csv`` (compared rows, then the
``not compared`` rows with their reason) and ``comparison.md``; prints the Markdown.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

from fare_core.errors import FareError
from fare_core.files import atomic_write

from .runs import Run, as_run, iter_samples
from .stats import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_PERMUTATIONS,
    aggregate_comparison,
    bh_family,
    paired_comparison,
)

DEFAULT_AGG_PERMUTATIONS = 1_000
COLUMNS = ["task", "metric", "kind", "aggregation", "n", "n_only_base", "n_only_run", "mean_a", "mean_b", "delta",
           "ci_low", "ci_high", "pvalue", "pvalue_bh", "n_permutations", "n_bootstrap", "seed", "reason"]


@dataclass
class Comparison:
    """Rows of compared metrics, the metrics left out (with the reason) and warnings."""

    base: Run
    run: Run
    rows: list[dict] = field(default_factory=list)
    not_compared: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------ aggregation functions


@lru_cache(maxsize=1)
def _fare_task_index() -> dict:
    from lm_eval.tasks._index import TaskIndex

    from fare_tasks import TASK_DIR

    return TaskIndex.build([Path(TASK_DIR)])


@cache
def installed_metric_list(task: str, config_source: str | None = None) -> tuple:
    """``metric_list`` of the installed lm-eval config of ``task`` with ``!function`` resolved.

    fare-moe's tasks are looked up by name in its task_configs; another task by the YAML path the
    run logged (``metadata.config_source``) only when that file lies inside lm-eval's own task
    folder: a results file never decides which code runs.
    """
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = _fare_task_index().get(task)
    path = entry.yaml_path if entry is not None else None
    if path is None and config_source:
        trusted = Path(lm_eval.tasks.__file__).resolve().parent
        candidate = Path(config_source).resolve()
        if candidate.is_file() and candidate.is_relative_to(trusted):
            path = candidate
    if path is None:
        return ()
    return tuple(load_yaml(path, resolve_func=True).get("metric_list") or ())


def resolve_aggregation(task: str, metric: str, logged, config_source: str | None = None) -> tuple[Callable | None, str]:
    """(the task's own aggregation function, note). ``logged`` is the run's ``aggregation`` entry."""
    if isinstance(logged, str) and "(" not in logged and " " not in logged:
        from lm_eval.api.registry import get_aggregation

        fn = get_aggregation(logged)
        return fn, "" if fn else f"aggregation {logged!r} is not registered in lm-eval"
    installed = {m.get("metric"): m.get("aggregation") for m in installed_metric_list(task, config_source)}
    fn = installed.get(metric)
    if isinstance(fn, str):
        return resolve_aggregation(task, metric, fn, config_source)
    if not callable(fn):
        return None, (f"no installed task config of {task} (fare-moe's or lm-eval's) defines the aggregation of "
                      f"{metric}; install the package that provides the task")
    note = ""
    if isinstance(logged, str) and logged.startswith("def "):
        try:
            if inspect.getsource(fn).strip() != logged.strip():
                note = "the installed aggregation's code differs from the one the run logged"
        except (OSError, TypeError):
            pass
    return fn, note


# ------------------------------------------------------------------------ pairing


def _read_task(run: Run, task: str) -> tuple[dict, list[str]]:
    """{(filter, key): values} of one task, and its filters in first-seen order."""
    items, filters = {}, []
    for rec in iter_samples(run, task):
        if rec["filter"] not in filters:
            filters.append(rec["filter"])
        items[(rec["filter"], rec["key"])] = rec["values"]
    return items, filters


def _number(value):
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def config_differences(base: Run, run: Run, tasks: list[str]) -> list[str]:
    """``key: base vs run`` for every setting that differs (per-task settings on shared tasks only)."""
    out = []
    for key in sorted(base.eval_config.keys() | run.eval_config.keys()):
        a, b = base.eval_config.get(key), run.eval_config.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key in ("fewshot", "judge", "task_versions"):
            a = {t: a.get(t) for t in tasks if t in a or t in b}
            b = {t: b.get(t) for t in tasks if t in a or t in b}
        if a != b:
            out.append(f"{key} {a!r} vs {b!r}")
    return out


def _require_samples(run: Run, role: str) -> None:
    if run.kind != "lm-eval" or not run.tasks:
        raise FareError(f"{run.path}: a {run.kind} folder without lm-eval samples cannot be {role}; pass an "
                        "lm-eval --output_path folder written with --log_samples")


def check_pair(base: Run, run: Run, *, allow_other_model: bool = False) -> list[str]:
    """Shared tasks of two runs; one-line errors for runs of different models or with no shared task."""
    _require_samples(base, "compared")
    _require_samples(run, "compared")
    if base.identity["model"] != run.identity["model"] and not allow_other_model:
        raise FareError(f"{run.path} evaluates {run.identity['model']!r} but the base {base.path} evaluates "
                        f"{base.identity['model']!r}; compare runs of one model (or pass --allow-other-model)")
    common = sorted(base.tasks.keys() & run.tasks.keys())
    if not common:
        raise FareError(f"{base.path} (tasks {', '.join(sorted(base.tasks))}) and {run.path} (tasks "
                        f"{', '.join(sorted(run.tasks))}) share no task; evaluate the same --tasks in both")
    return common


def refuse_overwrite(out: Path | None, names, overwrite: bool) -> None:
    """One-line error, before any work, when ``out`` already holds one of our outputs and ``--overwrite`` is off."""
    if out is None or overwrite:
        return
    if out.exists() and not out.is_dir():
        raise FareError(f"--out {out} is a file; pass a folder")
    present = [n for n in names if (out / n).exists()]
    if present:
        raise FareError(f"{out} already holds {', '.join(present)}; pass --overwrite to replace them or choose "
                        "another --out")


def require_int(minimum: int, **values) -> None:
    """One-line FareError naming the first value (resample or job count: minimum 1; seed: 0) that is
    not an integer >= ``minimum`` (stats would refuse it per metric, leaving every row not compared)."""
    allowed = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise FareError(f"{name}={value!r}; allowed: {allowed}")


def compare_runs(base, run, *, seed: int = 0, n_permutations: int = DEFAULT_PERMUTATIONS,
                 n_bootstrap: int = DEFAULT_BOOTSTRAP, n_agg_permutations: int = DEFAULT_AGG_PERMUTATIONS,
                 strict: bool = False, allow_other_model: bool = False, n_jobs: int = 1, progress=None,
                 metrics=None) -> Comparison:
    """Compare every metric of ``run`` with ``base`` (see the module docstring); BH is the caller's.

    ``n_jobs`` > 1 computes the aggregate metrics in that many worker processes (same numbers).
    ``metrics`` (``task/metric`` names; ``task/metric`` covers every filter of ``metric``) restricts
    the comparison to those metrics: the others are skipped silently (neither rows nor not_compared),
    the rows kept are the ones an unrestricted comparison gives."""
    require_int(1, n_permutations=n_permutations, n_bootstrap=n_bootstrap, n_agg_permutations=n_agg_permutations,
                n_jobs=n_jobs)
    require_int(0, seed=seed)
    base, run = as_run(base), as_run(run)
    common = check_pair(base, run, allow_other_model=allow_other_model)
    wanted = None if metrics is None else frozenset(metrics)
    if wanted is not None:
        wanted_tasks = {m.partition("/")[0] for m in wanted}
        common = [t for t in common if t in wanted_tasks]
    cmp = Comparison(base=base, run=run)
    for task in sorted(base.tasks.keys() ^ run.tasks.keys()):
        if wanted is not None and task not in wanted_tasks:
            continue
        where = base if task in base.tasks else run
        cmp.not_compared.append({"task": task, "metric": "*", "reason": f"task logged only in {where.path}"})
    if cmp.not_compared:
        cmp.warnings.append(f"tasks of one run only (not compared): {', '.join(r['task'] for r in cmp.not_compared)}")
    diffs = config_differences(base, run, common)
    if diffs:
        cmp.warnings.append("settings that change numbers differ: " + "; ".join(diffs))
    jobs: list[dict] = []
    order: dict[tuple[str, str], int] = {}
    for i, task in enumerate(common, 1):
        if progress:
            progress(f"compare: {task} ({i}/{len(common)})")
        _compare_task(cmp, task, jobs, order, seed=seed, n_permutations=n_permutations, n_bootstrap=n_bootstrap,
                      strict=strict, wanted=wanted)
    run_aggregate_jobs(cmp, jobs, n_jobs=n_jobs, progress=progress, seed=seed, n_permutations=n_agg_permutations,
                       n_bootstrap=n_bootstrap)
    cmp.rows.sort(key=lambda r: order[(r["task"], r["metric"])])  # the tasks' metric_list order
    return cmp


def _compare_task(cmp: Comparison, task: str, jobs: list, order: dict, *, seed, n_permutations, n_bootstrap,
                  strict, wanted=None) -> None:
    """Mean and partial metrics of one task into ``cmp``; aggregate metrics appended to ``jobs``
    (only the ``wanted`` ``task/metric[,filter]`` names when given)."""
    base, run = cmp.base, cmp.run
    a_items, filters = _read_task(base, task)
    b_items, b_filters = _read_task(run, task)
    filters += [f for f in b_filters if f not in filters]
    shared = [k for k in a_items if k in b_items]
    only_a, only_b = len(a_items) - len(shared), len(b_items) - len(shared)
    if only_a or only_b:
        msg = (f"{task}: {len(a_items)} items in {base.path}, {len(b_items)} in {run.path}; {only_a} only in the "
               f"base, {only_b} only in the run")
        if strict:
            raise FareError(f"{msg}; --strict refuses (drop --strict to compare the {len(shared)} shared items)")
        cmp.warnings.append(f"{msg}: compared on the {len(shared)} shared items")
    if not shared:
        cmp.not_compared.append({"task": task, "metric": "*", "reason": "no item (doc_hash) in both runs"})
        return
    cfg = base.task_configs.get(task) or run.task_configs.get(task) or {}
    metric_list = list(cfg.get("metric_list") or [])
    listed = {m.get("metric") for m in metric_list}
    logged = {m for v in a_items.values() for m in v} | {m for v in b_items.values() for m in v}
    metric_list += [{"metric": m, "aggregation": "mean"} for m in sorted(logged - listed)]
    for spec in metric_list:
        metric = spec.get("metric")
        for flt in filters:
            name = metric if len(filters) == 1 else f"{metric},{flt}"
            if wanted is not None and f"{task}/{metric}" not in wanted and f"{task}/{name}" not in wanted:
                continue
            keys = [k for k in shared if k[0] == flt]
            row = {"task": task, "metric": name}
            order.setdefault((task, name), len(order))
            a_has = sum(1 for k, v in a_items.items() if k[0] == flt and metric in v)
            b_has = sum(1 for k, v in b_items.items() if k[0] == flt and metric in v)
            pairs = [(a_items[k][metric], b_items[k][metric]) for k in keys
                     if metric in a_items[k] and metric in b_items[k]]
            if not a_has and not b_has:
                cmp.not_compared.append({**row, "reason": "logged on no item of either run (no evaluated item of this subset)"})
                continue
            if not pairs:
                cmp.not_compared.append({**row, "reason": f"logged on {a_has} base and {b_has} run items but on no "
                                                          "item both runs have"})
                continue
            agg = spec.get("aggregation", "mean")
            row.update(n_only_base=a_has - len(pairs), n_only_run=b_has - len(pairs),
                       aggregation=agg if isinstance(agg, str) and len(agg) < 40 else "task function")
            try:
                if agg == "mean":
                    nums = [(_number(a), _number(b)) for a, b in pairs]
                    nums = [(a, b) for a, b in nums if a is not None and b is not None]
                    if not nums:
                        cmp.not_compared.append({**row, "reason": "mean metric without finite numeric per-item values"})
                        continue
                    kind = "mean" if len(nums) == len(keys) else "partial"
                    res = paired_comparison([a for a, _ in nums], [b for _, b in nums], name=f"{task}/{name}",
                                            seed=seed, n_permutations=n_permutations, n_bootstrap=n_bootstrap)
                else:
                    source = (cfg.get("metadata") or {}).get("config_source")
                    fn, note = resolve_aggregation(task, metric, agg, source)
                    if fn is None:
                        cmp.not_compared.append({**row, "reason": note})
                        continue
                    if note:
                        cmp.warnings.append(f"{task}/{name}: {note}; recomputed with the installed one")
                    jobs.append({"row": row, "task": task, "metric": metric, "aggregation": agg, "source": source,
                                 "a": [a for a, _ in pairs], "b": [b for _, b in pairs]})
                    continue
            except ValueError as e:
                cmp.not_compared.append({**row, "reason": str(e)})
                continue
            cmp.rows.append({**row, "kind": kind, **{k: v for k, v in res.items() if k != "name"}})


def _aggregate_job(job: dict, options: dict):
    """One aggregate metric (runs in a worker process with --jobs): its result dict, or the reason."""
    fn, _ = resolve_aggregation(job["task"], job["metric"], job["aggregation"], job["source"])
    try:
        return aggregate_comparison(job["a"], job["b"], fn, name=f"{job['task']}/{job['row']['metric']}", **options)
    except ValueError as e:
        return str(e)


def run_aggregate_jobs(cmp: Comparison, jobs: list[dict], *, n_jobs: int = 1, progress=None, **options) -> None:
    """Compare the aggregate metrics (the slow part: two calls of the task's function per resample),
    in ``n_jobs`` worker processes when asked; rows keep the order of the jobs."""
    if progress and jobs:
        progress(f"compare: {len(jobs)} aggregate metrics on {n_jobs} process(es)")
    if n_jobs > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from itertools import repeat

        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx) as pool:
            results = list(pool.map(_aggregate_job, jobs, repeat(options)))
    else:
        results = []
        for i, job in enumerate(jobs, 1):
            if progress and len(job["a"]) >= 200:
                progress(f"compare: {job['task']}/{job['row']['metric']} (aggregate {i}/{len(jobs)}, "
                         f"{len(job['a'])} paired items)")
            results.append(_aggregate_job(job, options))
    for job, res in zip(jobs, results):
        if isinstance(res, str):
            cmp.not_compared.append({**job["row"], "reason": res})
        else:
            cmp.rows.append({**job["row"], "kind": "aggregate", **{k: v for k, v in res.items() if k != "name"}})


# ------------------------------------------------------------------------ output


def _fmt(x, spec="+.4f") -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def to_markdown(cmp_or_rows, not_compared=(), warnings=()) -> str:
    if isinstance(cmp_or_rows, Comparison):
        rows, not_compared, warnings = cmp_or_rows.rows, cmp_or_rows.not_compared, cmp_or_rows.warnings
    else:
        rows = cmp_or_rows
    lines = ["| task | metric | kind | n | base | run | delta | 95% CI | p | p (BH) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = f"{r['n']}" + (f" (+{r['n_only_base']}/{r['n_only_run']} unpaired)"
                           if r.get("n_only_base") or r.get("n_only_run") else "")
        lines.append(f"| {r['task']} | {r['metric']} | {r.get('kind', 'mean')} | {n} | {_fmt(r['mean_a'], '.4f')} | "
                     f"{_fmt(r['mean_b'], '.4f')} | {_fmt(r['delta'])} | [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | "
                     f"{r['pvalue']:.4g} | {_fmt(r.get('pvalue_bh'), '.4g')} |")
    if not_compared:
        lines += ["", "Not compared, because ...", ""]
        lines += [f"- {r['task']} / {r['metric']}: {r['reason']}" for r in not_compared]
    if warnings:
        lines += ["", "Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def write(cmp: Comparison, out: Path) -> None:
    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(cmp.rows)
            writer.writerows({**r, "kind": "not compared"} for r in cmp.not_compared)

    atomic_write(out / "comparison.csv", write_csv)
    atomic_write(out / "comparison.md", lambda tmp: tmp.write_text(to_markdown(cmp)))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fare compare", description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path, help="lm-eval --output_path of the base run (--log_samples)")
    ap.add_argument("run", type=Path, help="lm-eval --output_path of the run to compare with it")
    ap.add_argument("--out", type=Path, default=None, help="folder for comparison.csv / comparison.md")
    ap.add_argument("--strict", action="store_true", help="refuse when an item is in one run only")
    ap.add_argument("--allow-other-model", action="store_true", help="compare runs of different models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--permutations", type=int, default=DEFAULT_PERMUTATIONS)
    ap.add_argument("--agg-permutations", type=int, default=DEFAULT_AGG_PERMUTATIONS,
                    help="label-swap permutations for aggregate metrics (each recomputes the aggregate)")
    ap.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes for the aggregate metrics")
    ap.add_argument("--overwrite", action="store_true", help="replace comparison.csv/.md already in --out")
    args = ap.parse_args(argv)
    refuse_overwrite(args.out, ("comparison.csv", "comparison.md"), args.overwrite)
    require_int(1, **{f"--{flag.replace('_', '-')}": getattr(args, flag)
                      for flag in ("permutations", "agg_permutations", "bootstrap", "jobs")})
    require_int(0, **{"--seed": args.seed})
    cmp = compare_runs(args.base, args.run, seed=args.seed, n_permutations=args.permutations,
                       n_bootstrap=args.bootstrap, n_agg_permutations=args.agg_permutations, strict=args.strict,
                       allow_other_model=args.allow_other_model, n_jobs=args.jobs,
                       progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    if cmp.rows:
        cmp.rows = bh_family(cmp.rows)
    for w in cmp.warnings:
        print(f"fare compare: warning: {w}", file=sys.stderr)
    if args.out:
        write(cmp, args.out)
    print(to_markdown(cmp))
    return 0
