"""``fare`` pipeline subcommands (dispatched by ``fare_models.cli``): each takes argv, returns an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    from fare_core.tiny import build_tokenizer, is_tiny_spec

    return build_tokenizer() if is_tiny_spec(spec) else AutoTokenizer.from_pretrained(spec)


def prompts(argv: list[str]) -> int:
    """``fare prompts --out DIR``: write the seeded demographic prompt set (SPEC section 1)."""
    from .prompts import (
        AXES,
        DEFAULT_CONTEXTS_PER_DESCRIPTOR,
        DEFAULT_VALIDATION_FRACTION,
        build_prompt_set,
    )

    ap = argparse.ArgumentParser(prog="fare prompts", description="Write the seeded demographic prompt set: 576 "
                                 "neutral prompts and each descriptor inserted into --contexts-per-descriptor of them.")
    ap.add_argument("--out", required=True, type=Path, help="output folder (prompts.jsonl + prompts_manifest.json)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the context choice and the split (default 0)")
    ap.add_argument("--axes", default=None, help=f"comma-separated subset of: {', '.join(AXES)} (default: all)")
    ap.add_argument("--contexts-per-descriptor", type=contexts, default=DEFAULT_CONTEXTS_PER_DESCRIPTOR,
                    help="contexts each descriptor is inserted into (an integer or 'all'); default 80 -> 3,280 prompts")
    ap.add_argument("--validation-fraction", type=float, default=DEFAULT_VALIDATION_FRACTION,
                    help=f"share of contexts in the validation split (default {DEFAULT_VALIDATION_FRACTION:g})")
    ap.add_argument("--tokenizer", default=None, help="also write token_positions.jsonl for this tokenizer "
                    "(hub id, local path or fare-tiny): token count and inserted-descriptor token positions")
    args = ap.parse_args(argv)
    try:
        ps = build_prompt_set(
            seed=args.seed,
            axes=[a.strip() for a in args.axes.split(",") if a.strip()] if args.axes is not None else None,
            contexts_per_descriptor=args.contexts_per_descriptor,
            validation_fraction=args.validation_fraction,
        )
    except ValueError as e:
        return fail("prompts", e)
    ps.meta["versions"] = versions()
    if args.tokenizer:
        try:
            tok = _load_tokenizer(args.tokenizer)
            ps.meta["tokenizer"] = args.tokenizer
        except (ValueError, OSError) as e:
            return fail("prompts", e)
    path = ps.write(args.out)
    if args.tokenizer:
        from .prompts import token_positions

        with open(args.out / "token_positions.jsonl", "w", encoding="utf-8") as fh:
            for p in ps.prompts:
                tp = token_positions(p, tok)
                fh.write(json.dumps({"id": p.id, "n_tokens": len(tp["input_ids"]), "positions": tp["positions"]}) + "\n")
    m = ps.meta
    print(f"wrote {m['n_neutral']} neutral + {m['n_demographic']} demographic prompts "
          f"({m['n_by_split']['validation']} validation / {m['n_by_split']['test']} test) to {path}")
    return 0


def profile(argv: list[str]) -> int:
    """``fare profile --model M --out DIR``: routing extraction + FSP -> phi profile (SPEC sections 2-3)."""
    from .profiling import TOKEN_MODES, load_model, profile_model
    from .prompts import PromptSet, build_prompt_set
    from .work import Heartbeat

    ap = argparse.ArgumentParser(prog="fare profile", description="Run the prompt set through the model, record its "
                                 "routing and compute the FSP sensitivity profile phi (phi.safetensors, fsp_*.csv, plots).")
    ap.add_argument("--model", required=True, help="hub id, local path, fare-tiny or fare-tiny:<model_type>")
    ap.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --model; recorded")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--prompts", type=Path, default=None, help="folder or prompts.jsonl from fare prompts "
                    "(default: build the default set with --seed)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the default prompt set (default 0)")
    ap.add_argument("--split", default="validation", choices=["validation", "test", "all"],
                    help="prompts profiled (default: validation; the test split is kept for evaluation)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per forward batch (default 16)")
    ap.add_argument("--token-mode", default="all", choices=TOKEN_MODES,
                    help="all tokens, or shared: leave out the inserted descriptor's tokens (default: all)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="dtype the model is loaded in (default: auto = the checkpoint's)")
    add_fsp_options(ap)
    ap.add_argument("--no-plots", action="store_true", help="skip phi_heatmap.png and jsd_by_axis.png")
    add_progress_flags(ap)
    args = ap.parse_args(argv)
    try:
        opts = fsp_options(args)
        ps = PromptSet.read(args.prompts) if args.prompts else build_prompt_set(seed=args.seed)
        bars, heartbeat = progress_mode(args)
        model, tok, model_id = load_model(args.model, revision=args.revision, device=args.device, dtype=args.dtype,
                                          progress=bars)
        with Heartbeat("profile", lambda m: print(m, file=sys.stderr, flush=True), heartbeat or 0.0):
            out = profile_model(model, tok, ps, args.out, model_id=model_id, split=args.split,
                                batch_size=args.batch_size, token_mode=args.token_mode, options=opts,
                                plots=not args.no_plots, progress=bars,
                                extra_manifest={"revision": args.revision, "versions": versions()})
    except (ValueError, FileNotFoundError) as e:
        return fail("profile", e)
    d = out["result"].descriptors["model"]
    print(f"wrote {args.out / 'phi.safetensors'} ({len(out['result'].layers)} MoE layers); "
          f"model-wide Gini {d['gini']:.3f}, top-{out['result'].descriptors['top_share_k']} share {d['top_share']:.3f}, "
          f"rho(phi, f) {d['spearman_phi_f']:.3f}")
    return 0


from .run import (
    ablate,
    add_fsp_options,
    add_progress_flags,
    contexts,
    fail,
    fsp_options,
    layers,
    progress_mode,
    run,
    transfer,
    tune,
    versions,
)

__all__ = ["prompts", "profile", "layers", "tune", "ablate", "transfer", "run"]
