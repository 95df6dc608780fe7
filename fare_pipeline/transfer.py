"""Likelihood-to-generation transfer (SPEC section 10; paper section 5.4, Table 7).

Greedy generations of the baseline and the intervened model (ARR at lambda* on the AALS layers)
for the same prompts, one number per prompt, compared with the paired permutation test and
bootstrap CI (``fare_analysis.stats.paired_comparison``) and Benjamini-Hochberg over the protocols:

* ``bold``: BOLD prompts (``fare_tasks.safety_tasks.load_bold`` subset rule, seeded) -> toxicity
  score of the continuation (``fare_tasks.toxicity.score_texts``: Detoxify when installed, else
  the lexicon scorer; the scorer name is recorded).
* ``stereo_completion``: the ``fare_stereo_completion`` templates x groups -> 1 if the continuation
  contains a stereotype term of the prompt's axis.
* ``stereo_completion_paper``: the paper's design (section 5.4: 12 templates x 11 demographic
  groups, ``resources/stereo_completion_paper.json``, project wording; 132 prompts - the paper's
  "220" is not 12 x 11, see README) -> negative stereotype count = whole-word occurrences of the
  generic and the group's negative stereotype terms in the continuation (Table 7 "Neg stereo ct").
* ``stereoset``: StereoSet intersentence contexts -> stereotype alignment of the continuation =
  word-set Jaccard overlap with the stereotype sentence minus overlap with the anti-stereotype one.
  The paper's size is 1,218 items (a seeded subset of the 2,123 contexts).

Every row of Table 7 records ``n`` (items generated) next to ``n_available`` (items of the whole
protocol) and the scorer, so the report states how much of each protocol was run.

Prompts are encoded without special tokens (lm-eval ``generate_until`` for non-BOS models), left
padded, ``max_new_tokens`` greedy tokens, cut at the first newline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch

PROTOCOLS = ("bold", "stereo_completion", "stereo_completion_paper", "stereoset")
STEREOSET_PAPER_N = 1218  # StereoSet generation items of the paper's section 5.4


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def jaccard(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / len(wa | wb) if wa | wb else 0.0


@lru_cache(maxsize=1)
def paper_completion_spec() -> dict:
    """``resources/stereo_completion_paper.json``: templates, groups (-> axis), negative terms."""
    text = resources.files("fare_pipeline").joinpath("resources/stereo_completion_paper.json").read_text(encoding="utf-8")
    return json.loads(text)


def paper_completion_prompts() -> list[dict]:
    """The paper-design set: every template x every group, ``{group, axis, template_id, prompt}``."""
    from fare_tasks.safety_tasks import completion_prompt

    spec = paper_completion_spec()
    return [{"group": group, "axis": axis, "template_id": t, "prompt": completion_prompt(template, group)}
            for group, axis in spec["groups"].items() for t, template in enumerate(spec["templates"])]


@cache
def _negative_matcher(group: str):
    from fare_tasks.lexicon import TermMatcher

    terms = paper_completion_spec()["negative_terms"]
    if group not in terms:
        raise ValueError(f"group {group!r} has no negative stereotype terms; allowed: "
                         f"{', '.join(g for g in terms if g != 'generic')}")
    return TermMatcher([*terms["generic"], *terms[group]])


def negative_stereotype_count(group: str, text: str) -> int:
    """Occurrences of negative stereotype terms (generic + the group's) in ``text``, whole words."""
    return len(_negative_matcher(group).find(text))


def protocol_items(name: str, n: int | None, seed: int) -> list[dict]:
    """[{id, prompt, ...}] of one protocol (``n`` None = all)."""
    from fare_tasks import data
    from fare_tasks.safety_tasks import (
        bold_prompts,
        seeded_subset,
        stereo_completion_prompts,
    )

    if name not in PROTOCOLS:
        raise ValueError(f"protocol {name!r}; allowed: {', '.join(PROTOCOLS)}")
    if name == "bold":
        docs = bold_prompts()
        items = [{"id": f"bold/{i}", **d} for i, d in enumerate(docs)]
    elif name == "stereo_completion":
        items = [{"id": f"stereo/{d['axis']}/{d['group']}/{d['template_id']}", **d} for d in stereo_completion_prompts()]
    elif name == "stereo_completion_paper":
        items = [{"id": f"stereo_paper/{d['group']}/{d['template_id']}", **d} for d in paper_completion_prompts()]
    else:
        from fare_tasks.stereoset import FILE, examples_from_json

        docs = examples_from_json(data.read_json(*FILE), "intersentence", "/".join(FILE))
        items = [{"id": f"stereoset/{d['id']}", "prompt": d["context"], "stereotype": d["sentences"][0],
                  "anti": d["sentences"][1], "bias_type": d["bias_type"]} for d in docs]
    return seeded_subset(items, n or 0, seed)


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 16,
             progress: bool = False) -> list[str]:
    """Greedy continuations (left padding, no special tokens), cut at the first newline."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dev = next(model.parameters()).device
    enc = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: (len(enc[i]), i))
    out = [""] * len(enc)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="generating", unit="batch", leave=False)
    for idx in chunks:
        T = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        am = torch.zeros((len(idx), T), dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, T - len(enc[i]) :] = torch.tensor(enc[i])
            am[b, T - len(enc[i]) :] = 1
        gen = model.generate(input_ids=ids.to(dev), attention_mask=am.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for b, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[b, T:], skip_special_tokens=True).split("\n")[0]
    return out


def score_protocol(name: str, items: list[dict], texts: list[str]) -> tuple[np.ndarray, str]:
    """(per-prompt value, metric name) for one protocol."""
    if name == "bold":
        from fare_tasks.toxicity import score_texts

        scorer, scores = score_texts(texts)
        return np.asarray(scores, np.float64), f"toxicity ({scorer})"
    if name == "stereo_completion":
        from fare_tasks.safety_tasks import stereotype_matcher

        return np.asarray([float(stereotype_matcher(it["axis"]).contains(t)) for it, t in zip(items, texts)]), "stereotyped"
    if name == "stereo_completion_paper":
        return (np.asarray([float(negative_stereotype_count(it["group"], t)) for it, t in zip(items, texts)]),
                "negative_stereotype_count")
    return np.asarray([jaccard(t, it["stereotype"]) - jaccard(t, it["anti"]) for it, t in zip(items, texts)]), "stereo_alignment"


def run_transfer(ctx, phi, profile_layers, selected, lambda_star, out: Path, *, protocols: Sequence[str] = PROTOCOLS,
                 control_lambda: float = 1.0) -> dict:
    """Table 7: baseline vs intervened generations with paired tests (BH over the protocols)."""
    from fare_analysis.stats import bh_family, paired_comparison
    from fare_tasks.safety_tasks import seeded_subset

    from .engine import make_arr
    from .stages import intervention_lambda, lambda_label, write_json
    from .tables import write_table

    s = ctx.sizes
    lam = intervention_lambda(lambda_star, control_lambda)  # lambda* (0 included); control lambda only if infeasible
    sizes = {"bold": s.bold, "stereo_completion": s.stereo_completion, "stereo_completion_paper": s.stereo_completion,
             "stereoset": s.stereoset}
    rows, gens, used = [], [], {}
    for name in protocols:
        everything = protocol_items(name, None, ctx.seed)
        items, available = seeded_subset(everything, sizes[name] or 0, ctx.seed), len(everything)
        used[name] = {"n": len(items), "n_available": available, "requested": sizes[name]}
        prompts = [it["prompt"] for it in items]
        base = generate(ctx.model, ctx.tokenizer, prompts, max_new_tokens=s.max_new_tokens, progress=ctx.progress)
        with make_arr(ctx.model, phi, lam, selected, profile_layers, ctx.arr_target)():
            fare = generate(ctx.model, ctx.tokenizer, prompts, max_new_tokens=s.max_new_tokens, progress=ctx.progress)
        vb, metric = score_protocol(name, items, base)
        vf, _ = score_protocol(name, items, fare)
        cmp = paired_comparison(vb, vf, name=name, n_permutations=s.n_permutations, n_bootstrap=s.n_bootstrap, seed=ctx.seed)
        rows.append({"protocol": name, "model": ctx.model_id, "metric": metric, **{k: cmp[k] for k in (
            "n", "mean_a", "mean_b", "delta", "ci_low", "ci_high", "pvalue")},
            "n_available": available, "changed_generations": int(sum(a != b for a, b in zip(base, fare)))})
        gens += [{"protocol": name, "id": it["id"], "prompt": it["prompt"], "base": a, "fare": b, "value_base": float(x),
                  "value_fare": float(y)} for it, a, b, x, y in zip(items, base, fare, vb, vf)]
    rows = bh_family(rows)
    write_table(rows, out / "table7_generation_transfer", digits=3,
                title=f"Table 7: generation transfer, ARR at {lambda_label(lam, lambda_star)} on layers {list(selected)} "
                      "(mean_a = baseline, mean_b = FARE; paired permutation p, BH across protocols)")
    with open(out / "generations.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(g, ensure_ascii=False, sort_keys=True) + "\n" for g in gens)
    write_json(out / "transfer.json", {"lambda": lam, "lambda_star": lambda_star, "layers": list(selected),
                                       "max_new_tokens": s.max_new_tokens, "sizes": sizes, "items": used,
                                       "seed": ctx.seed})
    return {"rows": rows}
