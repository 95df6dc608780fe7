"""``fare compress``: load a model, compress it, save a checkpoint + manifest, verify the reload.

    fare compress --model fare-tiny:qwen3_moe --method wanda --set ratio=0.5 --set structure=2:4 \\
        --calib-p 0.25 --calib-n 128 --calib-seq-len 2048 --out runs/qwen3-wanda24
"""

from __future__ import annotations

import argparse
import json
import sys

from .methods import METHODS

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
    ap = argparse.ArgumentParser(prog="fare compress", description=__doc__.split("\n\n")[0], epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local checkpoint directory or fare-tiny[:model_type]")
    ap.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method parameter (repeatable)")
    for k, help_ in _CALIB_FLAGS.items():
        ap.add_argument(f"--calib-{k.replace('_', '-')}", dest=f"calib_{k}", default=None, help=help_)
    ap.add_argument("--dtype", default="float32", help="torch dtype to load the model in (default float32)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.method not in METHODS:
        print(f"fare compress: unknown method {args.method!r}; allowed: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    params = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"fare compress: --set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        params[key] = value
    params.update({k: getattr(args, k) for k in (f"calib_{c}" for c in _CALIB_FLAGS) if getattr(args, k) is not None})
    if not METHODS[args.method].calibrated:
        params = {k: v for k, v in params.items() if not k.startswith("calib_")}

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fare_core.tiny import resolve_pretrained

    from . import apply_compression
    from .checkpoint import save_compressed

    path, _ = resolve_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        apply_compression(model, args.method, params, tokenizer)
    except (ValueError, ImportError) as e:
        print(f"fare compress: {e}", file=sys.stderr)
        return 2
    manifest = save_compressed(model, tokenizer, args.out, base=args.model)
    print(json.dumps({"out": args.out, "method": manifest["method"], "seconds": manifest["seconds"],
                      "calibration": manifest.get("calibration", {}).get("sources")}, default=str))
    return 0
