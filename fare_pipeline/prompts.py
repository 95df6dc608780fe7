"""FARE stage 1: the demographic prompt set (SPEC section 1; paper section 3.2).

Contexts are template x profession pairs: 24 templates x 24 professions = **576 neutral
prompts** ("The doctor carefully reviewed ..."). A demographic prompt inserts one descriptor
before the profession ("The female doctor carefully reviewed ..."). The resources hold **41
descriptors** over the nine axes; each descriptor is placed into ``contexts_per_descriptor``
= 80 contexts, giving the paper's **41 x 80 = 3,280 demographic prompts** (3,280 = 41 x 80 is
the only factorisation with 30-60 descriptors and at most 576 contexts each; a full crossing
would be 576 x 41 = 23,616 and is available with ``contexts_per_descriptor="all"``).

Determinism without RNG-version dependence: every seeded choice ranks items by
``sha256("<seed>|<purpose>|<key>")``. The validation/test split is made at the context level
(a neutral prompt and all its variants share a split, so nothing leaks across splits), and
each descriptor takes the same share of its contexts from each split.

Each prompt records the character span of the inserted descriptor; :func:`span_token_positions`
maps it to token positions for any fast tokenizer, so analyses can use all tokens or only the
shared (non-inserted) ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

RESOURCES = Path(__file__).resolve().parent / "resources"
AXES = (
    "gender", "race", "religion", "nationality", "age", "sexuality", "disability",
    "socioeconomic_status", "political_ideology",
)
NEUTRAL = "neutral"
SPLITS = ("validation", "test")
SLOT = "{person}"
DEFAULT_CONTEXTS_PER_DESCRIPTOR = 80
DEFAULT_VALIDATION_FRACTION = 0.5
PROMPT_SET_VERSION = 1


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``axis``/``group`` are ``"neutral"`` for neutral prompts; ``span`` is the
    [start, end) character span of the inserted descriptor (None for neutral prompts)."""

    id: str
    text: str
    kind: str  # "neutral" | "demographic"
    axis: str
    group: str
    template_id: str
    profession: str
    context_id: str
    neutral_id: str
    split: str
    span: tuple[int, int] | None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["span"] = list(self.span) if self.span is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Prompt":
        d = dict(d)
        d["span"] = tuple(d["span"]) if d.get("span") is not None else None
        return cls(**d)


@dataclass
class PromptSet:
    prompts: list[Prompt]
    meta: dict

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def neutral(self) -> list[Prompt]:
        return [p for p in self.prompts if p.kind == NEUTRAL]

    @property
    def demographic(self) -> list[Prompt]:
        return [p for p in self.prompts if p.kind != NEUTRAL]

    def split(self, name: str) -> "PromptSet":
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
        return PromptSet([p for p in self.prompts if p.split == name], {**self.meta, "subset": name})

    def groups(self) -> list[str]:
        """Group names in a stable order: ``neutral`` first, then descriptors by axis."""
        seen = {NEUTRAL: None} if any(p.kind == NEUTRAL for p in self.prompts) else {}
        for p in self.prompts:
            if p.kind != NEUTRAL:
                seen.setdefault(p.group, None)
        return list(seen)

    def group_axes(self) -> dict[str, str]:
        return {p.group: p.axis for p in self.prompts}

    def write(self, out_dir) -> Path:
        """Write ``prompts.jsonl`` and ``prompts_manifest.json`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "prompts.jsonl", "w", encoding="utf-8") as fh:
            for p in self.prompts:
                fh.write(json.dumps(p.to_dict(), ensure_ascii=False, sort_keys=True) + "\n")
        (out / "prompts_manifest.json").write_text(json.dumps(self.meta, indent=2, sort_keys=True) + "\n")
        return out / "prompts.jsonl"

    @classmethod
    def read(cls, path) -> "PromptSet":
        path = Path(path)
        if path.is_dir():
            path = path / "prompts.jsonl"
        prompts = [Prompt.from_dict(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]
        if not prompts:
            raise ValueError(f"empty prompt set: {path} has no prompts")
        manifest = path.with_name("prompts_manifest.json")
        meta = json.loads(manifest.read_text()) if manifest.exists() else {}
        return cls(prompts, meta)


# --------------------------------------------------------------------------- resources


def _load(name: str) -> dict:
    return json.loads((RESOURCES / name).read_text(encoding="utf-8"))


def load_resources() -> dict:
    """Templates, professions and descriptors from ``fare_pipeline/resources`` (validated)."""
    templates = [(t["id"], t["text"]) for t in _load("templates.json")["templates"]]
    professions = list(_load("professions.json")["professions"])
    descriptors = {axis: list(v) for axis, v in _load("descriptors.json")["axes"].items()}
    _validate(templates, professions, descriptors)
    return {"templates": templates, "professions": professions, "descriptors": descriptors}


def _validate(templates, professions, descriptors) -> None:
    for tid, text in templates:
        if text.count(SLOT) != 1:
            raise ValueError(f"template {tid!r} must contain {SLOT} exactly once: {text!r}")
    unknown = [a for a in descriptors if a not in AXES]
    if unknown:
        raise ValueError(f"unknown axis {unknown[0]!r} in descriptors; allowed: {', '.join(AXES)}")
    flat = [d for v in descriptors.values() for d in v]
    dupes = sorted({d for d in flat if flat.count(d) > 1} | ({NEUTRAL} & set(flat)))
    if dupes:
        raise ValueError(f"descriptor {dupes[0]!r} is not unique across axes (or is reserved)")
    if len(set(professions)) != len(professions) or len({t for t, _ in templates}) != len(templates):
        raise ValueError("duplicate profession or template id in resources")


def rank_key(seed: int, purpose: str, key) -> str:
    """Seeded, platform-independent sort key (sha256 of seed|purpose|key) for every seeded order and split."""
    return hashlib.sha256(f"{seed}|{purpose}|{key}".encode()).hexdigest()


# --------------------------------------------------------------------------- building


def build_prompt_set(
    *,
    seed: int = 0,
    axes: Sequence[str] | None = None,
    contexts_per_descriptor: int | str = DEFAULT_CONTEXTS_PER_DESCRIPTOR,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    templates: Sequence[tuple[str, str]] | None = None,
    professions: Sequence[str] | None = None,
    descriptors: dict[str, Sequence[str]] | None = None,
) -> PromptSet:
    """Build the seeded prompt set (defaults: 576 neutral + 3,280 demographic prompts).

    ``axes`` restricts the descriptors to some of :data:`AXES`; ``templates``, ``professions``
    and ``descriptors`` override the packaged resources. ``contexts_per_descriptor`` is an int
    or ``"all"`` (full crossing).
    """
    res = load_resources()
    templates = list(templates) if templates is not None else res["templates"]
    professions = list(professions) if professions is not None else res["professions"]
    descriptors = {a: list(v) for a, v in (descriptors if descriptors is not None else res["descriptors"]).items()}
    _validate(templates, professions, descriptors)
    if axes is not None:
        axes = list(axes)
        bad = [a for a in axes if a not in AXES]
        if bad:
            raise ValueError(f"unknown axis {bad[0]!r}; allowed: {', '.join(AXES)}")
        descriptors = {a: v for a, v in descriptors.items() if a in axes}
    if not 0.0 <= validation_fraction <= 1.0:
        raise ValueError(f"validation_fraction={validation_fraction!r}; must lie in [0, 1]")

    contexts = [(tid, text, prof) for tid, text in templates for prof in professions]
    if not contexts:
        raise ValueError("empty prompt set: no template x profession contexts (templates or professions empty)")
    n_ctx = len(contexts)
    if contexts_per_descriptor == "all":
        k = n_ctx
    elif isinstance(contexts_per_descriptor, int) and not isinstance(contexts_per_descriptor, bool) and 0 <= contexts_per_descriptor <= n_ctx:
        k = contexts_per_descriptor
    else:
        raise ValueError(f"contexts_per_descriptor={contexts_per_descriptor!r}; allowed: 'all' or an int in [0, {n_ctx}]")
    n_desc = sum(len(v) for v in descriptors.values())
    if n_desc == 0 or k == 0:
        raise ValueError(
            f"empty prompt set: {n_desc} descriptors x {k} contexts per descriptor gives no demographic prompts"
        )

    ctx_id = {c: f"{c[0]}/{c[2]}" for c in contexts}
    ranked = sorted(contexts, key=lambda c: rank_key(seed, "split", ctx_id[c]))
    n_val = round(n_ctx * validation_fraction)
    split_of = {ctx_id[c]: ("validation" if i < n_val else "test") for i, c in enumerate(ranked)}
    by_split = {s: [c for c in contexts if split_of[ctx_id[c]] == s] for s in SPLITS}
    k_val = min(round(k * validation_fraction), len(by_split["validation"]))
    k_val = max(k_val, k - len(by_split["test"]))

    prompts: list[Prompt] = []
    for tid, text, prof in contexts:
        cid = ctx_id[(tid, text, prof)]
        prompts.append(Prompt(
            id=f"{cid}/{NEUTRAL}", text=text.replace(SLOT, prof), kind=NEUTRAL, axis=NEUTRAL, group=NEUTRAL,
            template_id=tid, profession=prof, context_id=cid, neutral_id=f"{cid}/{NEUTRAL}",
            split=split_of[cid], span=None,
        ))
    for axis in AXES:
        for desc in descriptors.get(axis, []):
            chosen = []
            for s, want in (("validation", k_val), ("test", k - k_val)):
                pool = sorted(by_split[s], key=lambda c: rank_key(seed, f"descriptor:{desc}", ctx_id[c]))
                chosen += pool[:want]
            chosen_ids = {ctx_id[c] for c in chosen}
            for tid, text, prof in contexts:  # keep context order
                cid = ctx_id[(tid, text, prof)]
                if cid not in chosen_ids:
                    continue
                start = text.index(SLOT)
                prompts.append(Prompt(
                    id=f"{cid}/{desc}", text=text.replace(SLOT, f"{desc} {prof}"), kind="demographic", axis=axis,
                    group=desc, template_id=tid, profession=prof, context_id=cid, neutral_id=f"{cid}/{NEUTRAL}",
                    split=split_of[cid], span=(start, start + len(desc)),
                ))
    n_neutral = n_ctx
    meta = {
        "version": PROMPT_SET_VERSION,
        "seed": seed,
        "axes": [a for a in AXES if descriptors.get(a)],
        "contexts_per_descriptor": k,
        "validation_fraction": validation_fraction,
        "split_unit": "context (template x profession)",
        "n_templates": len(templates),
        "n_professions": len(professions),
        "n_descriptors": n_desc,
        "n_neutral": n_neutral,
        "n_demographic": len(prompts) - n_neutral,
        "n_by_split": {s: sum(p.split == s for p in prompts) for s in SPLITS},
        "resources_sha256": hashlib.sha256(
            json.dumps([templates, professions, descriptors], sort_keys=True).encode()
        ).hexdigest(),
    }
    return PromptSet(prompts, meta)


# --------------------------------------------------------------------------- token positions


def span_token_positions(offsets: Iterable[tuple[int, int]], span: tuple[int, int] | None) -> list[int]:
    """Indices of tokens whose character offsets overlap ``span`` = [start, end).

    Zero-width offsets (special tokens) never overlap. ``span=None`` (neutral prompt) -> [].
    """
    if span is None:
        return []
    s, e = span
    if not 0 <= s < e:
        raise ValueError(f"span={span!r}; must satisfy 0 <= start < end")
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < e and b > s]


def token_positions(prompt: Prompt | str, tokenizer, span: tuple[int, int] | None = None, *, add_special_tokens: bool = True) -> dict:
    """Tokenise a prompt with a fast tokenizer; return ``input_ids``, the inserted-descriptor
    token ``positions`` and the ``shared`` (non-inserted) positions."""
    if isinstance(prompt, Prompt):
        text, span = prompt.text, prompt.span
    else:
        text = prompt
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} has no character offsets; a fast tokenizer is required")
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    positions = span_token_positions(enc["offset_mapping"], span)
    inserted = set(positions)
    return {
        "input_ids": list(enc["input_ids"]),
        "positions": positions,
        "shared": [i for i in range(len(enc["input_ids"])) if i not in inserted],
    }
