"""``fare compress``: load a model, compress it layer by layer, save a checkpoint + manifest, verify the reload.

    fare compress --model fare-tiny:qwen3_moe --method wanda --set ratio=0.5 --set structure=2:4 \\
        --calib-p 0.25 --calib-n 128 --calib-seq-len 2048 --out runs/qwen3-wanda24
"""

from __future__ import annotations

import argparse
import json
import sys

from fare_core.errors import FareError

from .methods import METHODS

DESCRIPTION = ("Load a model, compress it decoder layer by decoder layer, save a from_pretrained checkpoint "
               "with fare_compression.json and verify that it reloads.")
_CALIB_FLAGS = {
    "p": "safety proportion of the calibration set, in [0, 1] (default 0)",
    "n": "number of packed calibration sequences (default 16)",
    "seq_len": "tokens per sequence (default 128)",
    "seed": "seed of the record order (default 0)",
    "general": "general source: harmless (refusal_pairs/harmless_val.json) or a .txt/.jsonl file",
    "safety": "safety source: refusal_pairs (HarmBench behaviours + refusals) or a .jsonl file",
    "stats_tokens": "all, or refusal (safety sequences count only their reply tokens)",
}


def _parser() -> argparse.ArgumentParser:
    epilog = "method parameters (--set):\n" + "\n".join(
        f"  {name:<16} {', '.join(m.params)}" for name, m in METHODS.items())
    ap = argparse.ArgumentParser(prog="fare compress", description=DESCRIPTION, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="hub id, local checkpoint directory or fare-tiny[:model_type]")
    ap.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --model")
    ap.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    ap.add_argument("--out", required=True, help="output folder: new or empty (see --overwrite)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing non-empty --out folder (only once the new checkpoint is complete)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method parameter (repeatable)")
    for k, help_ in _CALIB_FLAGS.items():
        ap.add_argument(f"--calib-{k.replace('_', '-')}", dest=f"calib_{k}", default=None, help=help_)
    ap.add_argument("--device", default="auto",
                    help="where each decoder layer is computed: auto (cuda if available), cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="auto",
                    help="dtype to load the model in: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    ap.add_argument("--device-map", default=None,
                    help="from_pretrained device_map (e.g. auto); default: weights on CPU, one layer at a time on --device")
    ap.add_argument("--pipeline", default="layerwise", choices=("layerwise", "model"),
                    help="layerwise (default: one decoder layer's activations at a time) or model (whole-model passes)")
    ap.add_argument("--no-progress", action="store_true", help="no per-layer progress lines on stderr")
    return ap


def _params(args) -> dict:
    params = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FareError(f"--set expects KEY=VALUE, got {item!r}")
        params[key] = value
    params.update({k: getattr(args, k) for k in (f"calib_{c}" for c in _CALIB_FLAGS) if getattr(args, k) is not None})
    if not METHODS[args.method].calibrated:
        given = sorted(k for k in params if k.startswith("calib_"))
        if given:
            raise FareError(f"method {args.method!r} takes no calibration data; drop {', '.join('--' + k.replace('_', '-') for k in given)}")
    return params


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.method not in METHODS:
            raise FareError(f"unknown method {args.method!r}; allowed: {', '.join(METHODS)}")
        params = _params(args)
        from .checkpoint import compress_checkpoint

        manifest = compress_checkpoint(args.model, args.method, params, args.out, device=args.device,
                                       dtype=args.dtype, device_map=args.device_map, revision=args.revision,
                                       overwrite=args.overwrite, pipeline=args.pipeline,
                                       progress=not args.no_progress)
    except FareError as e:  # also fare_tasks' DataError (a missing calibration data file)
        print(f"fare compress: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "method": manifest["method"], "seconds": manifest["seconds"],
                      "device": manifest.get("device"), "dtype": manifest.get("dtype"),
                      "calibration": manifest.get("calibration", {}).get("sources")}, default=str))
    return 0
