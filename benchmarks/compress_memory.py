"""Peak memory of layer-by-layer compression, minus the weights, does not grow with depth.

For every depth (default 2, 4, 8, 16 decoder layers) and method, a fresh Python process builds a
random-initialised Qwen3-MoE of one fixed width from its transformers config (no download: hidden
256, 16 experts of intermediate size 128, top-2, 4 heads), builds the calibration set, then runs
``apply_compression`` and reports the peak live heap *above what existed before compression* (the
weights, the calibration set, the imported libraries), so the number is what compression itself
holds: activations, statistics, masks. Methods (one per calibrated family): wanda (sequential
sparsity), prune_reap (expert pruning; keeps each MoE layer's inputs), hc_smoe (merging; same);
``--methods`` adds sparsegpt or gptq_w4a16. Each runs with ``pipeline=layerwise`` (the default) and,
for comparison, ``pipeline=model`` (the previous whole-model driver, which holds every MoE layer's
inputs at once for prune_reap/hc_smoe and so grows with depth: it shows the measurement can see growth).

    python benchmarks/compress_memory.py [--depths 2,4,8,16] [--methods wanda,prune_reap,hc_smoe]
                                         [--calib-n 16] [--calib-seq-len 128] [--no-model-pipeline]

Live heap = glibc ``mallinfo2()`` (bytes in use, all arenas; torch's CPU tensors are malloc'ed),
read in a forward pre- and post-hook of every module and by a 1 kHz sampling thread (large torch
ops release the GIL), with ``PYTHONMALLOC=malloc`` and eager trimming (the child environment of
benchmarks/profiling_memory.py, whose mallinfo2 reader is reused). Peak RSS growth (VmHWM) is
printed as a cross-check. Exit status 1 when, for any method, the layerwise peak at the largest
depth exceeds the one at the smallest depth by more than max(TOLERANCE_MIB, TOLERANCE_FRAC x the
smallest). Linux + glibc only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profiling_memory import _live_bytes_fn, _proc_status_kib, child_env  # noqa: E402

WIDTH = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=16,
             num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, norm_topk_prob=True,
             vocab_size=258, max_position_embeddings=4096, tie_word_embeddings=False)
#: Allowed growth of the layerwise peak from the smallest to the largest depth: 2 MiB (a few
#: Python objects per layer: per-layer records in the method's info, the decoder's per-layer call
#: arguments) or 10 % of the smallest peak. One MoE layer's inputs are 2 MiB at the defaults
#: (16 x 128 tokens x 256 x 4 bytes), so holding even one extra layer's activations fails.
TOLERANCE_MIB = 2.0
TOLERANCE_FRAC = 0.10
PARAMS = {"wanda": {"ratio": 0.5}, "sparsegpt": {"ratio": 0.5}, "prune_reap": {"ratio": 0.25},
          "prune_frequency": {"ratio": 0.25}, "hc_smoe": {"ratio": 0.5}, "gptq_w4a16": {"group_size": 64}}


def build_model(depth: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from fare_core.tiny import randomize_routers

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(num_hidden_layers=depth, **WIDTH))
    randomize_routers(model)
    return model.eval()


def child(depth: int, method: str, pipeline: str, calib_n: int, seq_len: int) -> dict:
    import gc

    import torch

    from fare_compression import apply_compression
    from fare_compression.calibration import build_calibration
    from fare_core.tiny import build_tokenizer

    torch.set_num_threads(1)
    live = _live_bytes_fn()
    model = build_model(depth)
    tok = build_tokenizer()
    calib = {"calib_n": calib_n, "calib_seq_len": seq_len, "calib_p": 0.5}
    build_calibration(tok, n=calib_n, seq_len=seq_len, p=0.5)  # data files read and cached before the baseline
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = {"live": 0}

    def sample(*_):
        peak["live"] = max(peak["live"], live())

    handles = []
    for m in model.modules():
        handles += [m.register_forward_pre_hook(sample), m.register_forward_hook(sample)]
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            sample()
            time.sleep(0.001)

    gc.collect()
    base = live()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss0 = _proc_status_kib("VmRSS")
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    apply_compression(model, method, {**PARAMS[method], **calib}, tok, device="cpu", pipeline=pipeline,
                      progress=False)
    secs = time.perf_counter() - t0
    sample()
    stop.set()
    thread.join()
    return {"depth": depth, "method": method, "pipeline": pipeline, "weights_mib": weights / 2**20,
            "peak_mib": (peak["live"] - base) / 2**20, "peak_rss_mib": (_proc_status_kib("VmHWM") - rss0) / 1024,
            "seconds": secs}


def measure(depths, methods, pipelines, calib_n: int, seq_len: int) -> list[dict]:
    env = child_env()
    env.setdefault("FARE_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    rows = []
    for method in methods:
        for pipeline in pipelines:
            for depth in depths:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(depth), method, pipeline,
                       "--calib-n", str(calib_n), "--calib-seq-len", str(seq_len)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise RuntimeError(f"{method}/{pipeline}/depth {depth} failed:\n{proc.stderr[-4000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{method:<11} {pipeline:<9} layers {depth:>3}: weights {row['weights_mib']:7.1f} MiB, "
                      f"compression peak {row['peak_mib']:7.2f} MiB above them (peak RSS +{row['peak_rss_mib']:.1f} "
                      f"MiB), {row['seconds']:.1f} s", flush=True)
    return rows


def verdict(rows: list[dict]) -> tuple[bool, list[str]]:
    ok, lines = True, []
    for method in dict.fromkeys(r["method"] for r in rows):
        for pipeline in ("layerwise", "model"):
            rs = sorted((r for r in rows if r["method"] == method and r["pipeline"] == pipeline),
                        key=lambda r: r["depth"])
            if len(rs) < 2:
                continue
            lo, hi = rs[0], rs[-1]
            growth = hi["peak_mib"] - lo["peak_mib"]
            tol = max(TOLERANCE_MIB, TOLERANCE_FRAC * lo["peak_mib"])
            line = (f"{method} {pipeline}: peak {lo['peak_mib']:.2f} MiB at {lo['depth']} layers -> "
                    f"{hi['peak_mib']:.2f} MiB at {hi['depth']} layers (x{hi['peak_mib'] / max(lo['peak_mib'], 1e-9):.2f}; "
                    f"weights x{hi['weights_mib'] / lo['weights_mib']:.1f})")
            if pipeline == "layerwise":
                good = growth <= tol
                ok &= good
                line += f": {'OK' if good else 'GROWS'} (allowed +{tol:.2f} MiB)"
            else:
                line += " (whole-model driver, for comparison)"
            lines.append(line)
    return ok, lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="2,4,8,16", help="comma-separated decoder-layer counts")
    ap.add_argument("--methods", default="wanda,prune_reap,hc_smoe", help=f"comma-separated, of: {', '.join(PARAMS)}")
    ap.add_argument("--calib-n", type=int, default=16, help="calibration sequences")
    ap.add_argument("--calib-seq-len", type=int, default=128, help="tokens per calibration sequence")
    ap.add_argument("--no-model-pipeline", action="store_true", help="skip the whole-model driver comparison")
    ap.add_argument("--child", nargs=3, metavar=("DEPTH", "METHOD", "PIPELINE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        depth, method, pipeline = args.child
        print(json.dumps(child(int(depth), method, pipeline, args.calib_n, args.calib_seq_len)))
        return 0
    if not sys.platform.startswith("linux"):
        print(f"compress_memory needs Linux + glibc (mallinfo2, /proc); this is {sys.platform}", file=sys.stderr)
        return 2
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in PARAMS]
    if bad:
        print(f"unknown method(s) {bad}; allowed: {', '.join(PARAMS)}", file=sys.stderr)
        return 2
    depths = sorted(int(d) for d in args.depths.split(","))
    pipelines = ["layerwise"] + ([] if args.no_model_pipeline else ["model"])
    rows = measure(depths, methods, pipelines, args.calib_n, args.calib_seq_len)
    ok, lines = verdict(rows)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
