"""Calibration sets with a safety proportion p (compression_specs.md section 9, recommended protocol).

A fixed budget of N packed sequences of ``seq_len`` tokens: ``n_safe = round(p*N)`` come from a
safety/refusal source, ``N - n_safe`` from a general source. Each source is a seeded permutation of
its records, rendered identically (the tokenizer's chat template when it has one, else plain text),
tokenised, joined with EOS and packed into ``seq_len`` chunks (REAP-style packing, so no padding);
a source takes the first n chunks of its stream, so for a fixed seed the general subset for a larger
p is a prefix of the one for a smaller p (nested across p), and so is the safety subset.

``stats_tokens="refusal"`` restricts statistics on safety sequences to the assistant (refusal)
tokens, as Wei et al. (2024) do by default; general sequences always use all tokens. Padding (only
possible with a custom collation) never enters statistics: ``stat_mask`` is ``attention_mask`` and
the refusal mask combined.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fare_core.errors import FareError

SAFETY_SOURCES = ("refusal_pairs",)
GENERAL_SOURCES = ("harmless",)
STATS_TOKENS = ("all", "refusal")


@dataclass
class Record:
    prompt: str | None = None
    response: str | None = None
    text: str | None = None


@dataclass
class CalibrationSet:
    """Packed calibration batch. ``sources[i]`` is "safety" or "general" for row i."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    stat_mask: torch.Tensor
    sources: list[str]
    manifest: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batches(self, batch_size: int = 4):
        """Yield (input_ids, attention_mask, stat_mask) mini-batches in order."""
        for i in range(0, len(self), batch_size):
            sl = slice(i, i + batch_size)
            yield self.input_ids[sl], self.attention_mask[sl], self.stat_mask[sl]


# ----------------------------------------------------------------------------- sources


def _read_refusal_pairs() -> list[Record]:
    from fare_tasks.data import read_csv

    rows = read_csv("refusal_pairs", "adv_training_behaviors_safe_responses.csv", ["Behavior", "Safe_Response"])
    return [Record(prompt=r["Behavior"], response=r["Safe_Response"]) for r in rows]


def _read_harmless() -> list[Record]:
    from fare_tasks.data import read_json

    rows = read_json("refusal_pairs", "harmless_val.json")
    return [Record(prompt=r["instruction"]) for r in rows]


def _read_json_rows(path: Path) -> list[dict]:
    """The objects of a .json list or a .jsonl file; FareError naming the file (and line) otherwise."""
    raw = path.read_text(encoding="utf-8")
    lines = [(1, raw)] if path.suffix == ".json" else [(i, x) for i, x in enumerate(raw.splitlines(), 1) if x.strip()]
    rows = []
    for lineno, text in lines:
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as e:
            where = f"line {lineno}" if path.suffix == ".jsonl" else f"line {e.lineno}"
            raise FareError(f"calibration source file {path}: {where} is not valid JSON ({e.msg}); "
                            f"allowed: one JSON object per line (.jsonl) or a JSON list (.json)") from None
    rows = rows[0] if path.suffix == ".json" else rows
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise FareError(f"calibration source file {path}: records must be JSON objects; allowed: one object per "
                        "line (.jsonl) or a JSON list of objects (.json)")
    return rows


def _read_file(path: Path) -> list[Record]:
    """.txt: one record per non-empty line; .jsonl/.json: 'text', or 'prompt' (+ 'response')."""
    if path.suffix == ".txt":
        return [Record(text=line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix in (".jsonl", ".json"):
        rows = _read_json_rows(path)
        out = []
        for r in rows:
            if "text" in r:
                out.append(Record(text=r["text"]))
            elif "prompt" in r or "instruction" in r:
                out.append(Record(prompt=r.get("prompt", r.get("instruction")), response=r.get("response")))
            else:
                raise FareError(f"{path}: records need 'text' or 'prompt' (+ 'response'); got keys {sorted(r)}")
        return out
    raise FareError(f"calibration source file {path}: unsupported suffix {path.suffix!r}; allowed .txt, .jsonl, .json")


def check_source(name: str, kind: str) -> None:
    """FareError unless ``name`` is a named source or an existing file (checked before a model loads)."""
    if name not in (*SAFETY_SOURCES, *GENERAL_SOURCES) and not Path(name).is_file():
        allowed = SAFETY_SOURCES if kind == "safety" else GENERAL_SOURCES
        raise FareError(f"unknown {kind} calibration source {name!r}; allowed: {', '.join(allowed)} or a .txt/.jsonl file")


def load_source(name: str, kind: str) -> list[Record]:
    """Records of a named source ("refusal_pairs", "harmless") or of a local file path."""
    check_source(name, kind)
    if name == "refusal_pairs":
        recs = _read_refusal_pairs()
    elif name == "harmless":
        recs = _read_harmless()
    else:
        recs = _read_file(Path(name))
    if not recs:
        raise FareError(f"{kind} calibration source {name!r} has no records")
    return recs


# ----------------------------------------------------------------------------- rendering + packing


def _render(tok, rec: Record, chat: bool) -> tuple[list[int], list[bool]]:
    """Token ids of one record and a per-token flag marking response (refusal) tokens."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    if rec.text is not None:
        ids = enc(rec.text)
        return ids, [False] * len(ids)
    if chat:
        user = [{"role": "user", "content": rec.prompt}]
        prefix = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=rec.response is not None)
        full = prefix
        if rec.response is not None:
            full = tok.apply_chat_template(user + [{"role": "assistant", "content": rec.response}], tokenize=False)
        if not full.startswith(prefix):
            raise FareError("chat template renders the prompt differently with and without the reply")
        head, tail = enc(prefix), enc(full[len(prefix):])
    else:
        head = enc(rec.prompt + ("\n" if rec.response is not None else ""))
        tail = enc(rec.response) if rec.response is not None else []
    return head + tail, [False] * len(head) + [True] * len(tail)


def _stream(tok, recs: list[Record], n_chunks: int, seq_len: int, seed: int, chat: bool):
    """First n_chunks packed chunks of the seeded record stream (re-permuted per epoch)."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
    ids: list[int] = []
    resp: list[bool] = []
    need = n_chunks * seq_len
    rng = random.Random(seed)
    epochs, used = 0, 0
    while len(ids) < need and n_chunks > 0:
        order = list(range(len(recs)))
        rng.shuffle(order)
        epochs += 1
        for i in order:
            a, b = _render(tok, recs[i], chat)
            if eos is not None:
                a, b = a + [eos], b + [False]
            ids += a
            resp += b
            used += 1
            if len(ids) >= need:
                break
    chunks = [(ids[k * seq_len:(k + 1) * seq_len], resp[k * seq_len:(k + 1) * seq_len]) for k in range(n_chunks)]
    return chunks, {"records_used": used, "epochs": epochs}


def check_calibration(n=16, seq_len=128, p=0.0, stats_tokens="all", general=None, safety=None, **_) -> None:
    """FareError unless the sizes, the proportion, the statistics mode and the source names are allowed."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FareError(f"calibration size n={n!r} must be a positive integer")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise FareError(f"calibration seq_len={seq_len!r} must be an integer >= 2")
    try:
        ok = 0.0 <= float(p) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise FareError(f"safety proportion p={p!r} is outside [0, 1]; allowed: a number from 0 to 1")
    if stats_tokens not in STATS_TOKENS:
        raise FareError(f"stats_tokens={stats_tokens!r}; allowed: {', '.join(STATS_TOKENS)}")
    for kind, name in (("general", general), ("safety", safety)):
        if name is not None:
            check_source(str(name), kind)


def build_calibration(
    tokenizer,
    n: int = 16,
    seq_len: int = 128,
    p: float = 0.0,
    seed: int = 0,
    general: str = "harmless",
    safety: str = "refusal_pairs",
    stats_tokens: str = "all",
    chat: bool | None = None,
) -> CalibrationSet:
    """N packed sequences, round(p*N) of them from ``safety``, the rest from ``general``.

    chat: render with the tokenizer's chat template (None = when the tokenizer has one).
    """
    check_calibration(n, seq_len, p, stats_tokens)
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    n_safe = int(round(float(p) * n))
    n_gen = n - n_safe
    parts, info = {}, {}
    for kind, name, count, off in (("safety", safety, n_safe, 1), ("general", general, n_gen, 0)):
        if count == 0:
            parts[kind], info[kind] = [], {"source": name, "sequences": 0, "records_used": 0, "epochs": 0}
            continue
        recs = load_source(name, kind)
        chunks, meta = _stream(tokenizer, recs, count, seq_len, seed * 1000 + off, chat)
        parts[kind] = chunks
        info[kind] = {"source": name, "sequences": count, **meta}
    rows = [("safety", c) for c in parts["safety"]] + [("general", c) for c in parts["general"]]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    rows = [rows[i] for i in order]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((n, seq_len), pad, dtype=torch.long)
    attn = torch.zeros((n, seq_len), dtype=torch.long)
    stat = torch.zeros((n, seq_len), dtype=torch.bool)
    for r, (kind, (ids, resp)) in enumerate(rows):
        L = len(ids)
        input_ids[r, :L] = torch.tensor(ids, dtype=torch.long)
        attn[r, :L] = 1
        use = torch.tensor(resp) if (kind == "safety" and stats_tokens == "refusal") else torch.ones(L, dtype=torch.bool)
        stat[r, :L] = use
    sources = [kind for kind, _ in rows]
    for kind in ("safety", "general"):
        sel = torch.tensor([s == kind for s in sources], dtype=torch.bool)
        info[kind]["tokens"] = int(attn[sel].sum())
        info[kind]["stat_tokens"] = int(stat[sel].sum())
    manifest = {
        "p": float(p), "n": n, "seq_len": seq_len, "seed": seed, "chat_template": chat,
        "stats_tokens": stats_tokens, "packing": "concatenate records with EOS, cut into seq_len chunks",
        "sources": info,
    }
    return CalibrationSet(input_ids, attn, stat, sources, manifest)


CALIBRATION_KEYS = ("n", "seq_len", "p", "seed", "general", "safety", "stats_tokens", "chat")


def calibration_from_params(tokenizer, params: dict) -> CalibrationSet:
    """Build the set from method params named ``calib_<key>`` (e.g. calib_p=0.25, calib_n=32)."""
    if tokenizer is None:
        raise FareError("this compression method needs calibration data: pass a tokenizer")
    kw = {k: params[f"calib_{k}"] for k in CALIBRATION_KEYS if f"calib_{k}" in params}
    return build_calibration(tokenizer, **kw)
