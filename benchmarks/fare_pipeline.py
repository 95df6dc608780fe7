"""Work and wall time of the whole FARE pipeline (``fare run``), cached vs naive, side by side.

    python benchmarks/fare_pipeline.py [--model fare-tiny] [--keep DIR] [-- extra fare run flags]

Runs ``fare run`` twice on the same model in this process, with the same seeds and sizes (default
``--quick``; pass size flags after ``--`` to change them): ``--engine naive`` (every AALS probe, grid
point, evaluation, control, baseline and mask is a full forward of every request, one padded row
per request) and ``--engine cached`` (prefix trees over shared token prefixes; one unmodified pass per
split whose decoder-layer inputs serve every configuration, which re-runs only the layers from the
first one it edits; ARR at lambda = 0 is the base pass; equal configurations are scored once).

Work is counted by the same hooks for both (``fare_pipeline.work.LayerWork``, written to
``work.json`` by ``fare run``): token-layer evaluations = positions of every decoder-layer call
(padding included) summed over calls, for every stage - profiling and generation included, which
cost the same in both. Both runs must select the same layers and lambda* with the same grid.

Then profiling memory at two prompt-set sizes (``benchmarks/profiling_memory.py``).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("profile", "layers", "tune", "evaluate", "ablate", "transfer")


def fare_run(model: str, mode: str, out: Path, extra: list[str]) -> dict:
    from fare_pipeline.run import run

    argv = ["--model", model, "--out", str(out), "--engine", mode, "--no-resume", "--no-progress", *extra]
    if run(argv) != 0:
        sys.exit(f"fare run {' '.join(argv)} failed")
    work = json.loads((out / "work.json").read_text())["stages"]
    timings = json.loads((out / "timings.json").read_text())
    with open(out / "tune" / "lambda_grid.csv") as fh:
        grid = [(r["lambda"], r["pref"], r["feasible"]) for r in csv.DictReader(fh)]
    manifest = json.loads((out / "report" / "manifest.json").read_text())
    return {"mode": mode, "work": work, "timings": timings, "grid": grid,
            "selected": manifest["selected_layers"], "lambda_star": manifest["lambda_star"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fare-tiny")
    ap.add_argument("--keep", type=Path, default=None, help="keep both run folders here (default: a temp dir)")
    ap.add_argument("--memory-sizes", default="10,80", help="contexts per descriptor of the two profiling runs")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("extra", nargs="*", help="fare run flags after --; default --quick")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    extra = args.extra or ["--quick"]
    base = args.keep or Path(tempfile.mkdtemp(prefix="fare_bench_"))
    rows = [fare_run(args.model, mode, base / mode, extra) for mode in ("naive", "cached")]
    n, c = rows
    print(f"\nfare run --model {args.model} {' '.join(extra)}: layers {c['selected']}, lambda* {c['lambda_star']}")
    print(f"{'stage':<10}{'naive token-layer':>19}{'cached':>12}{'ratio':>8}{'naive s':>10}{'cached s':>10}")
    for s in (*STAGES, "total"):
        if s not in n["work"]:
            continue
        wn, wc = n["work"][s]["token_layer_evals"], c["work"][s]["token_layer_evals"]
        ratio = f"{wn / wc:.2f}x" if wc else "-"
        print(f"{s:<10}{wn:>19}{wc:>12}{ratio:>8}{n['timings'][s]:>10.2f}{c['timings'][s]:>10.2f}")
    same = n["selected"] == c["selected"] and n["lambda_star"] == c["lambda_star"] and n["grid"] == c["grid"]
    tn, tc = n["work"]["total"]["token_layer_evals"], c["work"]["total"]["token_layer_evals"]
    print(f"whole pipeline: {tn / tc:.2f}x fewer token-layer evaluations, "
          f"{n['timings']['total'] / c['timings']['total']:.2f}x less wall time (model load included); "
          f"identical layers, lambda* and lambda grid: {same}")
    print("(profile and transfer cost the same in both: one routing pass over the prompts and the generations; "
          "layers/tune: the prefix reuse is bounded by L(L+1)/2 of L^2 layer runs for the probes)")
    memory_ok = True
    if not args.no_memory:
        spec = importlib.util.spec_from_file_location("profiling_memory", ROOT / "benchmarks" / "profiling_memory.py")
        mem = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mem)
        print("\nprofiling memory (benchmarks/profiling_memory.py):")
        memory_ok = mem.main([f"--sizes={args.memory_sizes}"]) == 0
    if not same:
        sys.exit("cached and naive pipelines disagree")
    if not memory_ok:
        sys.exit("profiling memory grows with the number of prompts")


if __name__ == "__main__":
    main()
