"""Paired comparison of two lm-eval runs from their ``--log_samples`` files.

``fare compare BASELINE_DIR INTERVENED_DIR [--out DIR]`` finds ``samples_<task>_*.jsonl`` in both
output folders, pairs every numeric per-item metric by ``doc_hash`` (fare_tasks.stats), and
reports the mean difference (intervened - baseline), its bootstrap 95% CI and the paired
permutation p-value, with Benjamini-Hochberg adjustment across all rows (SPEC section 9).
Writes ``comparison.csv`` and ``comparison.md``; prints the Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from fare_core.files import atomic_write

from .stats import DEFAULT_BOOTSTRAP, DEFAULT_PERMUTATIONS, bh_family, pair_log_samples, paired_comparison

COLUMNS = ["task", "metric", "n", "mean_a", "mean_b", "delta", "ci_low", "ci_high", "pvalue", "pvalue_bh",
           "n_permutations", "n_bootstrap", "seed"]


def sample_files(run_dir: Path) -> dict[str, Path]:
    """{task: newest samples file} under an lm-eval ``--output_path`` folder."""
    found: dict[str, Path] = {}
    for path in sorted(Path(run_dir).rglob("samples_*.jsonl")):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        found[task] = path  # sorted by name: the timestamp suffix makes the last one the newest
    if not found:
        raise ValueError(f"no samples_*.jsonl under {str(run_dir)!r}; run lm_eval with --log_samples --output_path")
    return found


def mean_metrics(run_dir: Path) -> dict[str, list[str]]:
    """{task: metrics aggregated by a plain mean}, read from the run's results_*.json configs.

    Only those are compared item by item: the sign-flip permutation test and the bootstrap of the
    mean difference test a difference of means (a parity gap |pref - 0.5| or a BBQ bias score is
    not a mean of its per-item values).
    """
    out: dict[str, list[str]] = {}
    for path in sorted(Path(run_dir).rglob("results_*.json")):
        configs = json.loads(path.read_text()).get("configs", {})
        for task, cfg in configs.items():
            out[task] = [m["metric"] for m in cfg.get("metric_list", []) if m.get("aggregation") == "mean"]
    return out


def compare_runs(baseline: Path, intervened: Path, *, seed: int = 0, n_permutations: int = DEFAULT_PERMUTATIONS,
                 n_bootstrap: int = DEFAULT_BOOTSTRAP) -> list[dict]:
    a_files, b_files = sample_files(baseline), sample_files(intervened)
    common = sorted(a_files.keys() & b_files.keys())
    if not common:
        raise ValueError(f"the two runs share no task: {sorted(a_files)} vs {sorted(b_files)}")
    means = mean_metrics(baseline)
    rows = []
    for task in common:
        for metric in means.get(task, []):
            try:
                paired = pair_log_samples(a_files[task], b_files[task], metric, strict=False)
            except ValueError:
                continue  # metric not numeric per item (custom aggregation inputs)
            result = paired_comparison(paired.a, paired.b, name=f"{task}/{metric}", seed=seed,
                                       n_permutations=n_permutations, n_bootstrap=n_bootstrap)
            rows.append({"task": task, "metric": metric, **result})
    return bh_family(rows) if rows else rows


def to_markdown(rows: list[dict]) -> str:
    head = "| task | metric | n | baseline | intervened | delta | 95% CI | p | p (BH) |\n|---|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['task']} | {r['metric']} | {r['n']} | {r['mean_a']:.4f} | {r['mean_b']:.4f} | {r['delta']:+.4f} | "
        f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['pvalue']:.4g} | {r['pvalue_bh']:.4g} |\n"
        for r in rows
    )
    return head + body


def write(rows: list[dict], out: Path) -> None:
    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out / "comparison.csv", write_csv)
    atomic_write(out / "comparison.md", lambda tmp: tmp.write_text(to_markdown(rows)))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fare compare", description=__doc__.splitlines()[0])
    ap.add_argument("baseline", type=Path, help="lm-eval --output_path of the baseline run")
    ap.add_argument("intervened", type=Path, help="lm-eval --output_path of the intervened run")
    ap.add_argument("--out", type=Path, default=None, help="folder for comparison.csv / comparison.md")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--permutations", type=int, default=DEFAULT_PERMUTATIONS)
    ap.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP)
    args = ap.parse_args(argv)
    try:
        rows = compare_runs(args.baseline, args.intervened, seed=args.seed, n_permutations=args.permutations,
                            n_bootstrap=args.bootstrap)
    except ValueError as e:
        print(f"fare compare: {e}", file=sys.stderr)
        return 2
    if args.out:
        write(rows, args.out)
    print(to_markdown(rows))
    return 0
