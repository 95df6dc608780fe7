"""FARE stage 1-2 driver: run the prompt set through an MoE model with the streaming recorder.

Memory does not grow with the number of prompts beyond the caller's own prompt container:
``record_routing`` holds the ``fare_models.surgery.Recorder`` aggregates (O(L x E x G)), the group
names, one window of at most ``window`` prompts (a sorted index of 8 bytes per prompt, plus the
prompt references when the input is a one-shot iterator) and one batch of token ids and
activations. Prompts may come from a :class:`~.prompts.PromptSet`, any sequence, or a one-shot
iterator/generator (then ``groups=`` is required). Token modes: ``all`` tokens, or ``shared``
tokens only (the inserted descriptor's tokens are excluded from the demographic prompts'
statistics, SPEC section 1).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Sequence
from itertools import chain, islice

import torch

from .prompts import NEUTRAL, Prompt, PromptSet, span_token_positions

TOKEN_MODES = ("all", "shared")
DEFAULT_WINDOW = 8192
_LENGTH_CHUNK = 256  # prompts per tokenizer call when measuring a window's token lengths


def _window_order(tokenizer, get: Callable[[int], Prompt], m: int) -> array:
    """Window positions 0..m-1 sorted by (token length, prompt id, position), as 8-byte ints."""
    lengths = array("q")
    for i in range(0, m, _LENGTH_CHUNK):
        enc = tokenizer([get(k).text for k in range(i, min(i + _LENGTH_CHUNK, m))])["input_ids"]
        lengths.extend(len(x) for x in enc)
    return array("q", sorted(range(m), key=lambda k: (lengths[k], get(k).id, k)))


def _n_batches(n: int, window: int, batch_size: int) -> int:
    full, rest = divmod(n, window)
    return full * -(-window // batch_size) + -(-rest // batch_size)


def record_routing(
    model,
    tokenizer,
    prompts: PromptSet | Sequence[Prompt] | Iterable[Prompt],
    *,
    groups: Sequence[str] | None = None,
    group_of: Callable[[Prompt], str] | None = None,
    batch_size: int = 16,
    token_mode: str = "all",
    progress: bool = False,
    window: int = DEFAULT_WINDOW,
):
    """Forward every prompt once (no grad) under a Recorder; returns the Recorder.

    ``groups`` fixes the group order (default: ``neutral`` then descriptors in prompt order, which
    needs one pass over the prompts, so a one-shot iterator requires ``groups=``);
    ``group_of`` maps a prompt to its group name (default: ``prompt.group``; e.g. shards for SES).

    Prompts are consumed in windows of ``window`` prompts. Within a window they are sorted by
    (token length, prompt id, position) (deterministic) and cut into batches of ``batch_size`` with
    right padding; then the next window follows. With at most ``window`` prompts this is one global
    sort. Memory: the Recorder's O(L x E x G) aggregates + one window's sorted index (8 bytes per
    prompt; plus one reference per prompt for iterator input) + one batch; nothing is kept per
    prompt across windows. Token ids are encoded again per batch rather than stored.
    """
    from fare_models.surgery import Recorder

    source = prompts.prompts if isinstance(prompts, PromptSet) else prompts
    indexable = isinstance(source, Sequence)
    if indexable:
        if len(source) == 0:
            raise ValueError("empty prompt set: nothing to profile")
    else:
        it = iter(source)
        try:
            first = next(it)
        except StopIteration:
            raise ValueError("empty prompt set: nothing to profile") from None
    if token_mode not in TOKEN_MODES:
        raise ValueError(f"token_mode={token_mode!r}; allowed: {', '.join(TOKEN_MODES)}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r}; must be a positive integer")
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window={window!r}; must be a positive integer")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} has no character offsets; a fast tokenizer is required")
    one_shot = not indexable and iter(source) is source
    group_of = group_of or (lambda p: p.group)
    if groups is None:
        if one_shot:
            raise ValueError("prompts is a one-shot iterator: pass groups= (the default group order needs a "
                             "second pass over the prompts), or pass a PromptSet or a list")
        neutral, other = {}, {}  # insertion-ordered sets of group names, one pass
        for p in source:
            (neutral if p.kind == NEUTRAL else other).setdefault(group_of(p), None)
        groups = list(dict.fromkeys([*neutral, *other]))
    gid = {g: i for i, g in enumerate(groups)}

    def check_groups(ps: Iterable[Prompt]) -> None:
        missing = sorted({group_of(p) for p in ps} - gid.keys())
        if missing:
            raise ValueError(f"prompt group {missing[0]!r} not in groups {list(groups)}")

    if not one_shot:
        check_groups(source)  # fail before any forward; one-shot input is checked per window
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token to pad batches with")

    def encode(p: Prompt):
        enc = tokenizer(p.text, return_offsets_mapping=True)
        inserted = set(span_token_positions(enc["offset_mapping"], p.span))
        keep = [token_mode == "all" or i not in inserted for i in range(len(enc["input_ids"]))]
        return len(enc["input_ids"]), list(enc["input_ids"]), keep, gid[group_of(p)]

    def windows():
        """(prompt getter, window size) per window; for sequences the getter indexes the input."""
        if indexable:
            for start in range(0, len(source), window):
                yield (lambda k, s=start: source[s + k]), min(window, len(source) - start)
        else:
            rest = chain([first], it)
            while chunk := list(islice(rest, window)):
                if one_shot:
                    check_groups(chunk)
                yield chunk.__getitem__, len(chunk)

    def batches():
        for get, m in windows():
            order = _window_order(tokenizer, get, m)
            for i in range(0, m, batch_size):
                yield [get(k) for k in order[i : i + batch_size]]

    device = next(model.parameters()).device
    rec = Recorder(model, groups=list(groups))
    total = _n_batches(len(source), window, batch_size) if hasattr(source, "__len__") else None
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(batches(), desc="routing", unit="batch", total=total)
    else:
        from .work import Heartbeat

        todo = Heartbeat.track(batches(), "routing", total)  # progress lines without a terminal
    with rec, torch.inference_mode():
        for ps in todo:
            batch = [encode(p) for p in ps]
            T = max(r[0] for r in batch)
            ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
            attn = torch.zeros((len(batch), T), dtype=torch.long)
            keep = torch.zeros((len(batch), T), dtype=torch.bool)
            for b, (n, tok, k, _) in enumerate(batch):
                ids[b, :n] = torch.tensor(tok)
                attn[b, :n] = 1
                keep[b, :n] = torch.tensor(k)
            rec.set_groups([r[3] for r in batch])
            rec.set_token_mask(keep)
            model(input_ids=ids.to(device), attention_mask=attn.to(device))
    return rec


# --------------------------------------------------------------------------- `fare profile`


def load_model(spec: str, *, revision: str | None = None, device: str = "auto", dtype: str = "auto",
               progress: bool = True):
    """(model, tokenizer, model_id) for a hub id, local path or ``fare-tiny[:type]``.

    ``progress=False`` turns off transformers' weight-loading bar (it garbles log files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fare_core.tiny import resolve_pretrained

    spec, model_id = resolve_pretrained(spec)
    dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(dtypes)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, revision=revision, dtype=dtypes[dtype]).to(device).eval()
        tok = AutoTokenizer.from_pretrained(spec, revision=revision)
    except OSError as e:  # no such folder / hub id, offline, missing files: one line
        from fare_core.errors import FareError, one_line
        from fare_core.tiny import check_pretrained

        check_pretrained(spec)  # a mistyped local path: "no such directory, and not a valid hub id"
        raise FareError(f"--model {spec!r} could not be loaded: {one_line(e)[:400]}") from e
    finally:
        if bars and not progress:
            hf_logging.enable_progress_bar()
    return model, tok, model_id


def real_expert_mask(controller, num_experts: int) -> torch.Tensor:
    """[L, E] bool: which expert slots of the routing aggregates are real experts of each MoE layer
    (layers with fewer experts than ``num_experts`` are padded; FSP gives padded slots phi 0)."""
    return torch.tensor([[e < layer.num_experts for e in range(num_experts)] for layer in controller.layers])


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
    result = compute_fsp(rec.counts, rec.tokens, rec.group_names, prob_sums=rec.prob_sums,
                         group_axes=prompt_set.group_axes(), layers=rec.layer_indices,
                         expert_mask=real_expert_mask(ctl, rec.num_experts), options=options)
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
