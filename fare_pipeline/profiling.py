"""FARE stage 1-2 driver: run the prompt set through an MoE model with the streaming recorder.

Memory is O(L x E x G) (``fare_models.surgery.Recorder`` aggregates), independent of the number
of prompts. Token modes: ``all`` tokens, or ``shared`` tokens only (the inserted descriptor's
tokens are excluded from the demographic prompts' statistics, SPEC section 1).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .prompts import NEUTRAL, Prompt, PromptSet, span_token_positions

TOKEN_MODES = ("all", "shared")


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def record_routing(
    model,
    tokenizer,
    prompts: PromptSet | Sequence[Prompt],
    *,
    groups: Sequence[str] | None = None,
    group_of: Callable[[Prompt], str] | None = None,
    batch_size: int = 16,
    token_mode: str = "all",
    progress: bool = False,
):
    """Forward every prompt once (no grad) under a Recorder; returns the Recorder.

    ``groups`` fixes the group order (default: ``neutral`` then descriptors in prompt order);
    ``group_of`` maps a prompt to its group name (default: ``prompt.group``; e.g. shards for SES).
    Batches are formed after sorting by token length (deterministic) with right padding.
    """
    from fare_models.surgery import Recorder

    items = list(prompts.prompts if isinstance(prompts, PromptSet) else prompts)
    if not items:
        raise ValueError("empty prompt set: nothing to profile")
    if token_mode not in TOKEN_MODES:
        raise ValueError(f"token_mode={token_mode!r}; allowed: {', '.join(TOKEN_MODES)}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r}; must be a positive integer")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} has no character offsets; a fast tokenizer is required")
    group_of = group_of or (lambda p: p.group)
    if groups is None:
        groups = list(dict.fromkeys([group_of(p) for p in items if p.kind == NEUTRAL]
                                    + [group_of(p) for p in items if p.kind != NEUTRAL]))
    gid = {g: i for i, g in enumerate(groups)}
    missing = sorted({group_of(p) for p in items} - gid.keys())
    if missing:
        raise ValueError(f"prompt group {missing[0]!r} not in groups {list(groups)}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token to pad batches with")

    def encode(j):
        p = items[j]
        enc = tokenizer(p.text, return_offsets_mapping=True)
        inserted = set(span_token_positions(enc["offset_mapping"], p.span))
        keep = [token_mode == "all" or i not in inserted for i in range(len(enc["input_ids"]))]
        return len(enc["input_ids"]), p.id, list(enc["input_ids"]), keep, gid[group_of(p)]

    # only (length, id, index) is kept for all prompts; token ids are encoded again per batch, so
    # memory beyond the prompt list itself does not grow with the number of prompts
    order = sorted((len(tokenizer(p.text)["input_ids"]), p.id, j) for j, p in enumerate(items))

    device = next(model.parameters()).device
    rec = Recorder(model, groups=list(groups))
    batches = _batches(order, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="routing", unit="batch", total=-(-len(order) // batch_size))
    with rec, torch.inference_mode():
        for idx in batches:
            batch = [encode(j) for _, _, j in idx]
            T = max(r[0] for r in batch)
            ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
            attn = torch.zeros((len(batch), T), dtype=torch.long)
            keep = torch.zeros((len(batch), T), dtype=torch.bool)
            for b, (n, _, tok, k, _) in enumerate(batch):
                ids[b, :n] = torch.tensor(tok)
                attn[b, :n] = 1
                keep[b, :n] = torch.tensor(k)
            rec.set_groups([r[4] for r in batch])
            rec.set_token_mask(keep)
            model(input_ids=ids.to(device), attention_mask=attn.to(device))
    return rec


# --------------------------------------------------------------------------- `fare profile`


def load_model(spec: str, *, revision: str | None = None, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer, model_id) for a hub id, local path or ``fare-tiny[:type]``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fare_models.tiny import resolve_pretrained

    spec, model_id = resolve_pretrained(spec)
    dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(dtypes)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(spec, revision=revision, dtype=dtypes[dtype]).to(device).eval()
    tok = AutoTokenizer.from_pretrained(spec, revision=revision)
    return model, tok, model_id


def profile_model(
    model,
    tokenizer,
    prompt_set: PromptSet,
    out_dir,
    *,
    model_id: str | None = None,
    split: str = "validation",
    batch_size: int = 16,
    token_mode: str = "all",
    options=None,
    plots: bool = True,
    progress: bool = False,
    extra_manifest: dict | None = None,
) -> dict:
    """Routing extraction + FSP; writes phi.safetensors, routing/, fsp_* tables, plots, manifest.json."""
    import json
    from pathlib import Path

    from fare_models.profile import save_profile
    from fare_models.surgery import RoutingController

    from .fsp import FSPOptions, compute_fsp

    if split not in ("validation", "test", "all"):
        raise ValueError(f"split={split!r}; allowed: validation, test, all")
    subset = prompt_set if split == "all" else prompt_set.split(split)
    if not subset.prompts:
        raise ValueError(f"empty prompt set: no prompts in split {split!r}")
    options = options or FSPOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rec = record_routing(model, tokenizer, subset, groups=prompt_set.groups(), batch_size=batch_size,
                         token_mode=token_mode, progress=progress)
    rec.save(out / "routing")
    ctl = RoutingController.of(model)
    E = rec.num_experts
    mask = torch.tensor([[e < layer.num_experts for e in range(E)] for layer in ctl.layers])
    result = compute_fsp(rec.counts, rec.tokens, rec.group_names, prob_sums=rec.prob_sums,
                         group_axes=prompt_set.group_axes(), layers=rec.layer_indices, expert_mask=mask,
                         options=options)
    tables = result.write(out)
    run_info = {"split": split, "token_mode": token_mode, "batch_size": batch_size, "n_prompts": len(subset),
                "prompt_seed": prompt_set.meta.get("seed"), "prompts_sha256": prompt_set.meta.get("resources_sha256")}
    save_profile(out / "phi.safetensors", result.phi, rec.layer_indices, model_id, ctl.model_type,
                 fsp=result.options, profiling=run_info)
    files = [str(p.name) for p in tables] + ["phi.safetensors", "routing/"]
    if plots:
        from . import plots as P

        P.phi_heatmap(result.phi.numpy(), rec.layer_indices, out / "phi_heatmap.png")
        P.jsd_by_axis(result.layer["jsd_by_axis"], rec.layer_indices, out / "jsd_by_axis.png")
        files += ["phi_heatmap.png", "jsd_by_axis.png"]
    manifest = {"command": "profile", "model": model_id, "model_type": ctl.model_type, **run_info,
                "prompt_manifest": prompt_set.meta, "fsp": result.options, "files": files, **(extra_manifest or {})}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return {"result": result, "recorder": rec, "manifest": manifest}
