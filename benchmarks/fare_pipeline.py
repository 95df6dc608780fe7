"""Work and wall time of the FARE probe pipeline (AALS probes + lambda grid), cached vs naive.

    python benchmarks/fare_pipeline.py [--model fare-tiny] [--crows 256] [--ppl 128]

Both implementations score the same requests (CrowS validation pairs + held-out prompts, the
lm-eval formulation) on the same model and must select the same layers and lambda*:

* naive: every configuration (AALS base, one probe per MoE layer, every grid point including
  lambda = 0) is a full forward of every request, one padded row per request;
* cached: prefix trees (shared token prefixes computed once, tree attention), one unmodified
  pass whose decoder-layer inputs serve every probe and grid point (only layers >= the edited
  one re-run), lambda = 0 and the AALS base reuse that pass.

Work is counted in one unit for both: token-layer evaluations = positions of each forward batch
(padding included) x decoder layers run; layer calls = decoder-layer forward calls.
Then profiling memory at two prompt-set sizes (fresh subprocesses): peak RSS growth during
profiling (Linux VmHWM after a reset) over the warmed-up model and the size of the streaming aggregates, which must not grow with the prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pipeline(model, tok, ev, phi, layers, mode: str, grid, beta: float):
    from fare_pipeline.aals import select_lambda
    from fare_pipeline.engine import Engine, make_arr
    from fare_pipeline.stages import _metrics, aals_probes

    t = time.perf_counter()
    eng = Engine(model, tok, ev.requests, mode=mode)
    res, _ = aals_probes(model, eng, ev, phi, layers)
    sel = res.selected
    if mode == "naive":  # a naive grid re-runs every point, lambda = 0 included
        configs = [(repr(lam), make_arr(model, phi, lam, sel, layers), min(sel)) for lam in grid]
        key = repr
    else:
        configs = [("base", None, None)] + [(repr(lam), make_arr(model, phi, lam, sel, layers), min(sel))
                                            for lam in grid if lam != 0.0]
        key = lambda lam: "base" if lam == 0.0 else repr(lam)
    m = {k: _metrics(ev, v) for k, v in eng.score(configs).items()}
    base_ppl = m[key(0.0)]["ppl"] if 0.0 in grid else None
    op = select_lambda(grid, [m[key(x)]["pref"] for x in grid], [m[key(x)]["ppl"] for x in grid],
                       ppl_base=base_ppl, beta=beta)
    return {"mode": mode, **eng.counts(), "wall_s": time.perf_counter() - t, "selected": sel, "lambda_star": op.lambda_star,
            "grid_prefs": [r["pref"] for r in op.grid]}


def _status(field: str) -> int:
    """KiB value of a /proc/self/status field (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(contexts: int) -> None:
    import tracemalloc

    from fare_pipeline.profiling import load_model, record_routing
    from fare_pipeline.prompts import build_prompt_set

    model, tok, _ = load_model("fare-tiny", device="cpu")
    ps = build_prompt_set(contexts_per_descriptor=contexts)
    record_routing(model, tok, ps.prompts[:32], batch_size=16)  # warm-up: allocator and kernels
    rss0 = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    tracemalloc.start()
    rec = record_routing(model, tok, ps, batch_size=16)
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = _status("VmHWM")
    agg = sum(t.numel() * t.element_size() for t in (rec.counts, rec.prob_sums, rec.tokens))
    print(json.dumps({"prompts": len(ps.prompts), "tokens": int(rec.tokens[0].sum()), "rss_growth_kib": rss1 - rss0,
                      "python_peak_kib": py_peak // 1024, "aggregate_bytes": agg}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fare-tiny")
    ap.add_argument("--crows", type=int, default=256, help="CrowS validation pairs")
    ap.add_argument("--ppl", type=int, default=128, help="held-out prompts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--memory-sizes", default="10,80", help="contexts per descriptor of the two profiling runs")
    ap.add_argument("--_memory", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory is not None:
        return memory_child(args._memory)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from fare_pipeline.aals import DEFAULT_LAMBDA_GRID
    from fare_pipeline.evalsets import build_evalset
    from fare_pipeline.fsp import compute_fsp
    from fare_pipeline.profiling import load_model, record_routing
    from fare_pipeline.prompts import build_prompt_set

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model, tok, model_id = load_model(args.model)
    ps = build_prompt_set(seed=args.seed, contexts_per_descriptor=10)
    rec = record_routing(model, tok, ps.split("validation"), groups=ps.groups())
    phi = compute_fsp(rec.counts, rec.tokens, rec.group_names, layers=rec.layer_indices).phi.float()
    ev = build_evalset(tok, split="validation", seed=args.seed, crows_n=args.crows, ppl_n=args.ppl, tqa_n=0, prompt_set=ps)
    grid = list(DEFAULT_LAMBDA_GRID)
    print(f"model {model_id} on {next(model.parameters()).device}: {ev.info['crows_pairs']} CrowS pairs + "
          f"{ev.info['ppl_texts']} held-out prompts; AALS probes on {len(rec.layer_indices)} MoE layers + grid {grid}")
    rows = [pipeline(model, tok, ev, phi, rec.layer_indices, mode, grid, args.beta) for mode in ("naive", "cached")]
    hdr = (f"{'implementation':<15}{'positions/pass':>15}{'layers/position':>16}{'token-layer evals':>19}"
           f"{'layer calls':>12}{'wall s':>8}  selected  lambda*")
    print(hdr)
    for r in rows:
        units = r["token_layer_evals"] / r["positions_per_pass"]
        print(f"{r['mode']:<15}{r['positions_per_pass']:>15}{units:>16.1f}{r['token_layer_evals']:>19}"
              f"{r['layer_calls']:>12}{r['wall_s']:>8.2f}  {r['selected']!s:<9} {r['lambda_star']}")
    L, G, s = rows[0]["decoder_layers"], len(grid), min(rows[0]["selected"])
    print(f"(positions/pass: padded forward positions of one pass over all requests - prefix trees share the common "
          f"prefixes; layers/position: naive (1 + L + G) L = {(1 + L + G) * L} with L={L}, G={G}; cached "
          f"L + L(L+1)/2 + (G - 1 - reused) (L - s) with s={s} the first selected layer)")
    n, c = rows
    same = n["selected"] == c["selected"] and n["lambda_star"] == c["lambda_star"] and n["grid_prefs"] == c["grid_prefs"]
    print(f"ratio naive/cached: {n['token_layer_evals'] / c['token_layer_evals']:.2f}x token-layer evaluations, "
          f"{n['layer_calls'] / c['layer_calls']:.2f}x layer calls, {n['wall_s'] / c['wall_s']:.2f}x wall time; "
          f"identical layers, lambda* and grid preferences: {same}")
    print("\nprofiling memory (fresh process each; streaming aggregates O(L x E x G)):")
    print(f"{'prompts':>8}{'tokens':>9}{'peak RSS growth KiB':>21}{'python peak KiB':>17}{'aggregates B':>14}")
    for size in (int(x) for x in args.memory_sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--_memory", str(size)], capture_output=True, text=True, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{m['prompts']:>8}{m['tokens']:>9}{m['rss_growth_kib']:>21}{m['python_peak_kib']:>17}{m['aggregate_bytes']:>14}")
    if not same:
        sys.exit("cached and naive pipelines disagree")


if __name__ == "__main__":
    main()
