"""Time one compression cell per method family on the study's real model sizes, on a GPU.

Builds random-initialised Qwen3-30B-A3B and ERNIE-4.5-21B-A3B from their transformers config classes
with the published sizes (no weights download: the modules are created on the meta device and
materialised directly where the weights should live, then filled with N(0, 0.02) / router noise),
then for each method family - wanda (weight sparsity), prune_reap (expert pruning), hc_smoe
(merging), gptq_w4a16 (GPTQ via llm-compressor's sequential pipeline), bnb_nf4 (bitsandbytes) -
re-materialises a fresh model, compresses it layer by layer and prints the wall time, the weights,
the peak accelerator memory (``torch.cuda.max_memory_allocated``) and the peak above the weights.

    bash benchmarks/gpu_study.sh [--layers 4] [--weights cpu|gpu] [--calib-n 32] [--calib-seq-len 2048]
    bash benchmarks/gpu_study.sh --tiny            # same code on CPU with tiny widths (used by the tests)

``--layers N`` keeps the published width but only N decoder layers (default: the published depth;
a full-depth GPTQ of a 30B MoE takes hours): memory does not depend on depth with the layerwise
driver, and the time per layer is printed with its full-depth extrapolation. ``--weights cpu``
(default) keeps the weights in host memory and moves one decoder layer at a time to the GPU (the
configuration that fits any model on one GPU); ``--weights gpu`` places them on the GPU first
(needs the whole bf16 model in GPU memory: 61 GB for Qwen3-30B-A3B, 43 GB for ERNIE-4.5-21B-A3B).
GPTQ always runs through llm-compressor, which onloads each layer to its main device itself.
Prints one JSON line per cell after the table (``--json`` for only those).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

#: Published sizes (config.json of Qwen/Qwen3-30B-A3B and baidu/ERNIE-4.5-21B-A3B-PT; the latter are
#: transformers' Ernie4_5_MoeConfig defaults).
MODELS = {
    "qwen3_30b_a3b": ("qwen3_moe", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
        tie_word_embeddings=False)),
    "ernie45_21b_a3b": ("ernie4_5_moe", dict(
        hidden_size=2560, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=28,
        num_attention_heads=20, num_key_value_heads=4, moe_num_experts=64, moe_k=6, moe_num_shared_experts=2,
        moe_layer_start_index=1, moe_layer_interval=1, vocab_size=103424, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=True)),
}
#: --tiny: the same families at a width that runs in seconds on CPU.
TINY = {
    "qwen3_30b_a3b": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                          num_experts_per_tok=2, vocab_size=258),
    "ernie45_21b_a3b": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, moe_num_experts=8, moe_k=2,
                            moe_num_shared_experts=1, vocab_size=258),
}
CELLS = {"wanda": {"ratio": 0.5}, "prune_reap": {"ratio": 0.25}, "hc_smoe": {"ratio": 0.25},
         "gptq_w4a16": {}, "bnb_nf4": {}}


def config_for(name: str, tiny: bool, layers: int | None):
    from transformers import AutoConfig

    model_type, sizes = MODELS[name]
    sizes = {**sizes, **(TINY[name] if tiny else {})}
    if layers:
        sizes["num_hidden_layers"] = layers
    return AutoConfig.for_model(model_type, **sizes)


def materialise(config, device: str, dtype):
    """A randomly initialised model with its weights allocated directly on ``device`` (no CPU copy
    for GPU placement, no init pass over 30B parameters on the host)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from fare_core.tiny import randomize_routers

    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model = model.to_empty(device=device).eval()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0) if "norm" in name else p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
        randomize_routers(model)
    return model


def run_cell(name: str, method: str, args, device: str) -> dict:
    import gc

    import torch

    from fare_compression import MissingBackendError, apply_compression
    from fare_compression.methods import METHODS
    from fare_core.tiny import build_tokenizer

    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = config_for(name, args.tiny, args.layers)
    place = "cpu" if (args.tiny or args.weights == "cpu") else device
    gpu = device.startswith("cuda")
    model = materialise(cfg, place, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tok = build_tokenizer()  # a byte tokenizer is enough for timing: ids < 258 exist in every vocabulary
    params = dict(CELLS[method])
    if method.startswith("gptq") and args.tiny:
        params["group_size"] = 32
    if METHODS[method].calibrated:
        params.update(calib_n=args.calib_n, calib_seq_len=args.calib_seq_len, calib_p=0.5)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_gpu = torch.cuda.memory_allocated() if gpu else 0
    t0 = time.perf_counter()
    row = {"model": name, "method": method, "layers": cfg.num_hidden_layers, "weights_on": place,
           "compute_device": device, "dtype": str(dtype).removeprefix("torch."), "weights_gib": weights / 2**30}
    try:
        apply_compression(model, method, params, tok, device=device, progress=not args.json)
    except MissingBackendError as e:
        row["skipped"] = str(e)
        return row
    if gpu:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    full = MODELS[name][1]["num_hidden_layers"]
    row.update(seconds=secs, seconds_per_layer=secs / cfg.num_hidden_layers,
               full_depth_seconds_est=secs / cfg.num_hidden_layers * (full if not args.tiny else cfg.num_hidden_layers))
    if gpu:
        peak = torch.cuda.max_memory_allocated()
        row.update(peak_gpu_gib=peak / 2**30, peak_gpu_above_start_gib=(peak - base_gpu) / 2**30)
    del model
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny widths on CPU (a smoke run of the same code)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--methods", default=",".join(CELLS), help=f"comma-separated, of: {', '.join(CELLS)}")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers to build (default: the published depth)")
    ap.add_argument("--weights", choices=("cpu", "gpu"), default="cpu",
                    help="where the weights live: cpu (one layer at a time on the GPU) or gpu")
    ap.add_argument("--calib-n", type=int, default=None, help="calibration sequences (default 32; 4 with --tiny)")
    ap.add_argument("--calib-seq-len", type=int, default=None, help="tokens per sequence (default 2048; 32 with --tiny)")
    ap.add_argument("--json", action="store_true", help="print only one JSON line per cell")
    args = ap.parse_args(argv)
    import torch

    args.calib_n = args.calib_n or (4 if args.tiny else 32)
    args.calib_seq_len = args.calib_seq_len or (32 if args.tiny else 2048)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if not args.tiny and device == "cpu":
        print("gpu_study: no CUDA device; run with --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in models if m not in MODELS] + [m for m in methods if m not in CELLS]
    if bad:
        print(f"gpu_study: unknown {bad}; models: {', '.join(MODELS)}; methods: {', '.join(CELLS)}", file=sys.stderr)
        return 2
    if args.tiny:
        torch.set_num_threads(1)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    rows = []
    for name in models:
        for method in methods:
            row = run_cell(name, method, args, device)
            rows.append(row)
            if args.json:
                continue
            if "skipped" in row:
                print(f"{name:<16} {method:<11} skipped: {row['skipped']}", flush=True)
                continue
            mem = (f"peak GPU {row['peak_gpu_gib']:.2f} GiB ({row['peak_gpu_above_start_gib']:.2f} above the start)"
                   if "peak_gpu_gib" in row else "peak GPU n/a (CPU)")
            print(f"{name:<16} {method:<11} {row['layers']:>2} layers, weights {row['weights_gib']:.3f} GiB on "
                  f"{row['weights_on']}: {row['seconds']:.1f} s ({row['seconds_per_layer']:.2f} s/layer, "
                  f"full depth ~{row['full_depth_seconds_est'] / 60:.1f} min), {mem}", flush=True)
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
