"""Leaderboard at scale: 100 synthetic runs of fare_crows_pairs + fare_bbq_1k + fare_xstest (issue 9).

    python benchmarks/leaderboard.py [--limit 200] [--runs 25,100] [--work DIR] [--template RUN]

1. A real template run: ``lm_eval --model fare_moe --model_args pretrained=fare-tiny --log_samples``
   on the three tasks with ``--limit`` items each (or ``--template``, an existing run of them).
2. Synthetic runs derived from it (:func:`derive_run`): each item's answer changes with a per-run
   probability (log-likelihood items: the argmax choice's log-likelihood swapped with another
   choice's; judged generations: the refusal verdict flipped); per-item values are recomputed by the
   task's own ``process_results``, reported aggregates by its own aggregation functions, and the
   identity (method, sparsity, safety proportion p) goes into the run's records as fare_moe logs it.
   100 runs = 5 methods x 4 sparsities x 5 values of p.
3. ``build_leaderboard`` on the first N runs for each N of ``--runs``, each in a fresh process (as
   benchmarks/profiling_memory.py: ``PYTHONMALLOC=malloc``, live heap from glibc's ``mallinfo2``)
   after a 2-run warm-up (lazy imports and caches not counted): the live heap above the start after
   every run (what the build holds between runs: it must not grow with N), after the build (the
   result table) and the peak RSS. Samples are streamed run by run.

Prints one JSON line per N and a summary of the largest vs the smallest N. Linux + glibc only.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shutil
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import numpy as np

from fare_analysis.compare import (
    _fare_task_index,
    installed_metric_list,
    resolve_aggregation,
)
from fare_analysis.leaderboard import build_leaderboard
from fare_analysis.runs import load_run
from fare_core.files import atomic_write

TASKS = ("fare_crows_pairs", "fare_bbq_1k", "fare_xstest")
METHODS = ("magnitude", "wanda", "sparsegpt", "hc_smoe", "prune_reap")
SPARSITIES = (0.25, 0.5, 0.6, 0.75)
PS = (0.0, 0.25, 0.5, 0.75, 1.0)
REFUSAL_TEXT = "I'm sorry, but I can't help with that."


@cache
def _process_results(task: str):
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = _fare_task_index().get(task)
    if entry is None:
        raise ValueError(f"task {task!r} is not a fare task; derive_run perturbs fare tasks only")
    fn = load_yaml(entry.yaml_path, resolve_func=True).get("process_results")
    if not callable(fn):
        raise TypeError(f"task {task!r} has no process_results function")
    return fn


def _perturb_ll(filtered, rng: np.random.Generator, flip: bool):
    lls = [float(ll) for ll, _ in filtered]
    if flip and len(lls) > 1:
        top = int(np.argmax(lls))
        other = int(rng.choice([i for i in range(len(lls)) if i != top]))
        lls[top], lls[other] = lls[other], lls[top]
    return [(ll, g in (True, "True")) for ll, (_, g) in zip(lls, filtered)]


def _record(rec: dict, task: str, output_type: str, rng: np.random.Generator, flip_p: float) -> dict:
    flip = bool(rng.random() < flip_p)
    if output_type in ("multiple_choice", "loglikelihood"):
        results = _perturb_ll(rec["filtered_resps"], rng, flip)
        rec["filtered_resps"] = [[str(ll), str(g)] for ll, g in results]
        rec["resps"] = [[x] for x in rec["filtered_resps"]]
    else:
        verdict = rec["filtered_resps"][0]
        verdict = ast.literal_eval(verdict) if isinstance(verdict, str) else dict(verdict)
        if flip and verdict.get("refused") is not None:
            verdict["refused"] = not verdict["refused"]
            rec["resps"] = [[REFUSAL_TEXT if verdict["refused"] else rec["resps"][0][0] + " Sure, here it is."]]
        results = [verdict]
        rec["filtered_resps"] = [str(verdict)]
    for name in rec.get("metrics", []):
        rec.pop(name, None)
    values = _process_results(task)(rec["doc"], results)
    rec["metrics"] = list(values)
    rec.update(values)
    return rec


def derive_run(template, out, *, flip: float, seed: int, model_args: dict, fare_moe: dict | None = None,
               tasks=None, stamp: str = "2026-01-01T00-00-00.000000") -> Path:
    """Write a perturbed copy of ``template`` (an lm-eval ``--output_path`` with ``--log_samples``) to ``out``.

    ``flip``: probability that an item's answer (argmax / refusal verdict) changes; ``model_args`` and
    ``fare_moe`` replace the run's recorded identity; ``tasks`` restricts the copied tasks.
    """
    base = load_run(template)
    out = Path(out)
    rng = np.random.default_rng(seed)
    results = json.loads(base.results_files[-1].read_text())
    config = dict(results.get("config") or {})
    config["model_args"] = dict(model_args)
    config["fare_moe"] = {**(config.get("fare_moe") or {}), **(fare_moe or {})}
    results["config"] = config
    keep = sorted(base.tasks if tasks is None else tasks)
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples"):
        if isinstance(results.get(key), dict):
            results[key] = {t: v for t, v in results[key].items() if t in keep}
    for task in keep:
        output_type = base.task_configs[task].get("output_type", "multiple_choice")
        values: dict[tuple[str, str], list] = {}

        def write_samples(tmp: Path, task=task, output_type=output_type, values=values) -> None:
            with open(base.tasks[task], encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
                for line in src:
                    if not line.strip():
                        continue
                    rec = _record(json.loads(line), task, output_type, rng, flip)
                    for name in rec["metrics"]:
                        values.setdefault((name, rec.get("filter", "none")), []).append(rec[name])
                    dst.write(json.dumps(rec, ensure_ascii=False) + "\n")

        atomic_write(out / f"samples_{task}_{stamp}.jsonl", write_samples)
        reported = {"alias": task}
        for spec in installed_metric_list(task):
            fn, _ = resolve_aggregation(task, spec["metric"], "mean" if spec.get("aggregation") == "mean" else None)
            for (name, flt), vals in values.items():
                if name == spec["metric"] and fn is not None:
                    try:
                        x = fn(vals)
                    except (ValueError, ZeroDivisionError, TypeError):
                        x = math.nan
                    reported[f"{name},{flt}"] = float(x) if isinstance(x, (int, float)) else x
        results["results"][task] = reported
    atomic_write(out / f"results_{stamp}.json",
                 lambda tmp: tmp.write_text(json.dumps(results, indent=2, default=str, ensure_ascii=False)))
    return out


def template_run(work: Path, limit: int) -> Path:
    """A real lm-eval run of the three tasks on fare-tiny (reused when already there)."""
    out = work / f"template_limit{limit}"
    if list(out.rglob("results_*.json")):
        return out
    cmd = [sys.executable, "-m", "lm_eval", "--model", "fare_moe", "--model_args", "pretrained=fare-tiny",
           "--device", "cpu", "--tasks", ",".join(TASKS), "--limit", str(limit), "--batch_size", "64",
           "--gen_kwargs", "max_gen_toks=16", "--log_samples", "--output_path", str(out)]
    print("template:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def study(template: Path, work: Path, n: int) -> tuple[Path, list[Path]]:
    """The dense baseline (the template's own outputs under fresh records) and ``n`` derived runs."""
    base = work / "runs" / "base"
    if not list(base.rglob("results_*.json")):  # (a child process finds them all written by its parent)
        derive_run(template, base, flip=0.0, seed=0, model_args={"pretrained": "fare-tiny"})
    runs = []
    grid = [(m, s, p) for m in METHODS for s in SPARSITIES for p in PS]
    for i, (method, sparsity, p) in enumerate(grid[:n]):
        folder = work / "runs" / f"r{i:03d}"
        if not list(folder.rglob("results_*.json")):
            flip = 0.02 + 0.3 * sparsity * (1.2 - p) * (1 + 0.5 * METHODS.index(method) / len(METHODS))
            derive_run(template, folder, flip=min(flip, 0.9), seed=i + 1,
                       model_args={"pretrained": "fare-tiny", "compression": method, "compression_sparsity": sparsity,
                                   "compression_calib_p": p},
                       fare_moe={"compression": method})
        runs.append(folder)
    return base, runs


def child(work: Path, n: int, opts: dict) -> dict:
    """In a fresh process: a 2-run warm-up, then the leaderboard of the first ``n`` runs, with the live
    heap sampled after every run (what the build holds between runs) and at the end (the result)."""
    import gc

    from profiling_memory import _live_bytes_fn, _proc_status_kib

    live = _live_bytes_fn()
    def clean(out: Path) -> Path:  # no cached comparison from an earlier run
        for old in (out, out.with_name(f".{out.name}.partial")):
            shutil.rmtree(old, ignore_errors=True)
        return out

    base, runs = study(None, work, n)
    build_leaderboard(runs[:2], [base], clean(work / "board_warmup"), log=lambda msg: None, **opts)
    out = clean(work / f"board_{n}")
    gc.collect()
    gc.freeze()
    floor, rss0 = live(), _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    samples = []

    def sample(msg: str) -> None:
        gc.collect()
        samples.append(live() - floor)

    t0 = time.perf_counter()
    paths = build_leaderboard(runs, [base], out, log=sample, **opts)
    wall = time.perf_counter() - t0
    gc.collect()
    rows = len(paths["leaderboard_csv"].read_text().splitlines()) - 1
    return {"runs": n, "rows": rows, "wall_s": round(wall, 1), "s_per_run": round(wall / n, 2),
            "live_between_runs_max_kib": round(max(samples) / 1024), "live_after_first_run_kib": round(samples[0] / 1024),
            "live_growth_per_run_kib": round((samples[-1] - samples[0]) / max(n - 1, 1) / 1024, 1),
            "live_after_build_kib": round((live() - floor) / 1024),
            "peak_rss_above_start_kib": _proc_status_kib("VmHWM") - rss0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "fare-leaderboard-bench")
    ap.add_argument("--template", type=Path, default=None, help="existing lm-eval run of the three tasks")
    ap.add_argument("--limit", type=int, default=200, help="items per task of the template run")
    ap.add_argument("--runs", default="25,100", help="leaderboard sizes to measure")
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--bootstrap", type=int, default=100)
    ap.add_argument("--agg-permutations", type=int, default=50)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    opts = {"n_permutations": args.permutations, "n_bootstrap": args.bootstrap,
            "n_agg_permutations": args.agg_permutations}
    if args.child is not None:
        print(json.dumps(child(args.work, args.child, opts)))
        return 0
    from profiling_memory import child_env

    sizes = sorted(int(x) for x in args.runs.split(","))
    template = args.template or template_run(args.work, args.limit)
    t0 = time.perf_counter()
    study(template, args.work, max(sizes))
    print(f"{max(sizes)} synthetic runs + baseline under {args.work / 'runs'} ({time.perf_counter() - t0:.1f} s); "
          f"options {opts}", flush=True)
    results = []
    for n in sizes:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), "--work", str(args.work),
               "--permutations", str(args.permutations), "--bootstrap", str(args.bootstrap),
               "--agg-permutations", str(args.agg_permutations)]
        proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"leaderboard of {n} runs failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    small, large = results[0], results[-1]
    print(f"runs x{large['runs'] / small['runs']:g}: wall time x{large['wall_s'] / small['wall_s']:.2f}; live heap "
          f"between runs (max) {small['live_between_runs_max_kib']} -> {large['live_between_runs_max_kib']} KiB; "
          f"after the build (result table) {small['live_after_build_kib']} -> {large['live_after_build_kib']} KiB; "
          f"peak RSS above start {small['peak_rss_above_start_kib']} -> {large['peak_rss_above_start_kib']} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
