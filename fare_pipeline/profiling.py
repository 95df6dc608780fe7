"""FARE stage 1-2 driver: run the prompt set through an MoE model with the streaming recorder.

Memory is O(L x E x G) (``fare_models.surgery.Recorder`` aggregates), independent of the number
of prompts. Token modes: ``all`` tokens, or ``shared`` tokens only (the inserted descriptor's
tokens are excluded from the demographic prompts' statistics, SPEC section 1).
"""

from __future__ import annotations

from typing import Sequence

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
    batch_size: int = 16,
    token_mode: str = "all",
    progress: bool = False,
):
    """Forward every prompt once (no grad) under a Recorder; returns the Recorder.

    ``groups`` fixes the group order (default: ``neutral`` then descriptors in prompt order).
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
    if groups is None:
        groups = list(dict.fromkeys([NEUTRAL] + [p.group for p in items if p.kind != NEUTRAL]))
    gid = {g: i for i, g in enumerate(groups)}
    missing = sorted({p.group for p in items} - gid.keys())
    if missing:
        raise ValueError(f"prompt group {missing[0]!r} not in groups {list(groups)}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token to pad batches with")

    encoded = []
    for p in items:
        enc = tokenizer(p.text, return_offsets_mapping=True)
        inserted = set(span_token_positions(enc["offset_mapping"], p.span))
        keep = [token_mode == "all" or i not in inserted for i in range(len(enc["input_ids"]))]
        encoded.append((len(enc["input_ids"]), p.id, list(enc["input_ids"]), keep, gid[p.group]))
    encoded.sort(key=lambda r: (r[0], r[1]))

    device = next(model.parameters()).device
    rec = Recorder(model, groups=list(groups))
    batches = list(_batches(encoded, batch_size))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="routing", unit="batch")
    with rec, torch.inference_mode():
        for batch in batches:
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
