"""Wall time and peak memory of every compression method on a tiny MoE, and HC-SMoE clustering speed.

Each method runs in its own child process (so peak RSS is per method): the child loads the model,
builds the calibration set, runs ``apply_compression`` and reports the method's wall time, the
process peak RSS (``ru_maxrss``) and its growth during the method. Methods whose library is not
installed are listed as skipped. Then the Lance-Williams average linkage used by HC-SMoE is timed
against a naive pairwise implementation (recomputing every cluster-pair mean at each merge) and
against scipy, on random expert representations, after checking all three give the same clusters.

    python benchmarks/compression.py [--model fare-tiny:qwen3_moe] [--calib-n 16] [--calib-seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = [
    ("magnitude", {"ratio": 0.5}), ("wanda", {"ratio": 0.5}), ("wanda", {"structure": "2:4"}),
    ("sparsegpt", {"ratio": 0.5}), ("sparsegpt", {"structure": "2:4"}), ("prune_frequency", {"ratio": 0.25}),
    ("prune_reap", {"ratio": 0.25}), ("hc_smoe", {"ratio": 0.25}), ("bnb_int8", {}), ("bnb_nf4", {}),
    ("gptq_w4a16", {"group_size": 32}), ("gptq_w8a16", {"group_size": 32}),
]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(model_spec: str, method: str, params: dict, calib: dict, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fare_compression import MissingBackendError, apply_compression
    from fare_compression.methods import METHODS as REGISTRY
    from fare_core.tiny import resolve_pretrained

    path, _ = resolve_pretrained(model_spec)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    before = _rss_mb()
    t0 = time.perf_counter()
    try:
        apply_compression(model, method, {**params, **(calib if REGISTRY[method].calibrated else {})}, tok)
    except MissingBackendError as e:
        return {"skipped": str(e)}
    secs = time.perf_counter() - t0
    return {"seconds": secs, "peak_rss_mb": _rss_mb(), "rss_growth_mb": _rss_mb() - before}


def bench_clustering(sizes=((8, 4), (64, 32), (128, 96))) -> list[dict]:
    import torch
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import pdist

    from fare_compression.hcsmoe import agglomerative, naive_average_linkage

    rows = []
    g = torch.Generator().manual_seed(0)
    for n, r in sizes:
        x = torch.randn(n, 64, generator=g, dtype=torch.float64)
        d = torch.cdist(x, x)
        t0 = time.perf_counter()
        ours, _ = agglomerative(d, r)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        naive = naive_average_linkage(d, r)
        t_naive = time.perf_counter() - t0
        t0 = time.perf_counter()
        linkage(pdist(x.numpy()), method="average")
        t_scipy = time.perf_counter() - t0
        rows.append({"experts": n, "clusters": r, "ours_s": t_ours, "naive_s": t_naive, "scipy_s": t_scipy,
                     "same_clusters": ours == naive})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fare-tiny:qwen3_moe")
    ap.add_argument("--calib-n", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--calib-p", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for tiny models)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    calib = {"calib_n": args.calib_n, "calib_seq_len": args.calib_seq_len, "calib_p": args.calib_p}
    if args.child:
        method, params = json.loads(args.child)
        print("RESULT " + json.dumps(child(args.model, method, params, calib, args.threads)))
        return
    print(f"model {args.model}; calibration {args.calib_n} x {args.calib_seq_len} tokens, p={args.calib_p}; "
          f"torch threads {args.threads}")
    print(f"{'method':<30} {'wall s':>8} {'peak RSS MB':>12} {'RSS growth MB':>14} {'process s':>10}")
    for method, params in METHODS:
        label = method + ("" if not params else " " + ",".join(f"{k}={v}" for k, v in params.items()))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--calib-n", str(args.calib_n),
                               "--calib-seq-len", str(args.calib_seq_len), "--calib-p", str(args.calib_p),
                               "--threads", str(args.threads), "--child", json.dumps([method, params])],
                              capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        wall = time.perf_counter() - t0
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{label:<30} FAILED: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            continue
        res = json.loads(line[7:])
        if "skipped" in res:
            print(f"{label:<30} skipped: {res['skipped'][:90]}")
            continue
        print(f"{label:<30} {res['seconds']:>8.2f} {res['peak_rss_mb']:>12.0f} {res['rss_growth_mb']:>14.1f} {wall:>10.1f}")
    print("\nHC-SMoE average-linkage clustering (random 64-d expert representations):")
    print(f"{'experts':>8} {'clusters':>9} {'ours s':>9} {'naive s':>9} {'scipy s':>9} {'speed-up':>9} {'same':>5}")
    for r in bench_clustering():
        print(f"{r['experts']:>8} {r['clusters']:>9} {r['ours_s']:>9.4f} {r['naive_s']:>9.4f} {r['scipy_s']:>9.4f} "
              f"{r['naive_s'] / r['ours_s']:>8.1f}x {str(r['same_clusters']):>5}")


if __name__ == "__main__":
    main()
