"""Parse and validate ``fare_moe`` model_args (values arrive typed by lm-eval's handle_arg_string).

Lists do not survive lm-eval's ``k=v,k=v`` splitting, so list-valued arguments accept ``|``,
``;`` or spaces as separators (``layers=3|5|7``, ``layers=2-5``, ``mask=3:5|3:7``) as well as real
lists from JSON model_args (``--model_args '{"layers": [3, 5], "mask": [[3, 5], [3, 7]]}'``).
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from dataclasses import dataclass, field

from fare_core.errors import FareError

INTERVENTIONS = ("none", "arr", "mask")
ARR_TARGETS = ("logits", "selection")
PROFILE_CHECKS = ("model", "shape")

#: fare_moe's own arguments (everything else is passed to lm-eval's HFLM).
OWN_ARGS = (
    "intervention", "profile", "lam", "layers", "mask", "arr_target", "profile_check",
    "record_routing", "record_trace", "compression",
)
#: Arguments that only mean something with intervention=arr (refused otherwise, never silently ignored).
ARR_ONLY = ("profile", "lam", "layers", "arr_target", "profile_check")
COMPRESSION_PREFIX = "compression_"
_SEP = re.compile(r"[|;\s]+")


@dataclass
class FareArgs:
    intervention: str = "none"
    profile: str | None = None
    lam: float = 1.0
    layers: list[int] | None = None
    mask: list[tuple[int, int]] = field(default_factory=list)
    arr_target: str = "logits"
    profile_check: str = "model"
    record_routing: str | None = None
    record_trace: str | None = None
    compression: str | None = None
    compression_params: dict = field(default_factory=dict)


def _items(value, name: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    if isinstance(value, str):
        return [v for v in _SEP.split(value.strip().strip("[]")) if v]
    raise FareError(f"{name}={value!r} is not a list")


def parse_layers(value) -> list[int] | None:
    if value is None or value == "" or value == "all":
        return None
    out: list[int] = []
    for item in _items(value, "layers"):
        text = str(item).strip()
        m = re.fullmatch(r"(\d+)-(\d+)", text)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise FareError(f"layers range {text!r} is empty; write low-high, e.g. 2-5")
            out.extend(range(lo, hi + 1))
        elif re.fullmatch(r"-?\d+", text):
            out.append(int(text))
        else:
            raise FareError(
                f"layers={value!r}: {text!r} is not a layer index; use integers separated by '|' "
                "(layers=3|5|7), ranges (layers=2-5) or a JSON list"
            )
    return out


def parse_mask(value) -> list[tuple[int, int]]:
    if value is None or value == "":
        return []
    pairs = []
    for item in _items(value, "mask"):
        if isinstance(item, (list, tuple)) and len(item) == 2:
            a, b = item
        else:
            m = re.fullmatch(r"\s*(-?\d+)\s*:\s*(-?\d+)\s*", str(item))
            if not m:
                raise FareError(
                    f"mask entry {item!r} is malformed; write layer:expert pairs separated by '|' "
                    "(mask=3:5|3:7) or a JSON list of [layer, expert] pairs"
                )
            a, b = m.groups()
        try:
            pairs.append((int(a), int(b)))
        except (TypeError, ValueError):
            raise FareError(f"mask entry {item!r} is not a pair of integers layer:expert") from None
    return pairs


def parse_lam(value) -> float:
    if isinstance(value, bool):
        raise FareError(f"lam={value!r} is not a number; lam must be a number >= 0")
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise FareError(f"lam={value!r} is not a number; lam must be a number >= 0") from None
    if math.isnan(lam) or lam < 0 or math.isinf(lam):
        raise FareError(f"lam={value!r} is not allowed; lam must be a finite number >= 0")
    return lam


def _choice(name: str, value, allowed) -> str:
    text = str(value).strip().lower()
    if text not in allowed:
        raise FareError(f"{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    return text


def split_model_args(kwargs: dict, passthrough_names) -> tuple[FareArgs, dict]:
    """Separate fare_moe's own arguments from those for lm-eval's HFLM / from_pretrained.

    An unknown key close to one of ours (or to an HFLM argument) is an error with a suggestion:
    it must never be forwarded silently to ``from_pretrained``.
    """
    own = {k: kwargs.pop(k) for k in list(kwargs) if k in OWN_ARGS}
    comp = {k[len(COMPRESSION_PREFIX):]: kwargs.pop(k) for k in list(kwargs) if k.startswith(COMPRESSION_PREFIX)}
    known = set(OWN_ARGS) | set(passthrough_names)
    for key in kwargs:
        if key in known:
            continue
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
        if close:
            raise FareError(f"unknown model_args key {key!r}; did you mean {close[0]!r}?")
    args = FareArgs()
    args.intervention = _choice("intervention", own.get("intervention", "none"), INTERVENTIONS)
    args.arr_target = _choice("arr_target", own.get("arr_target", "logits"), ARR_TARGETS)
    args.profile_check = _choice("profile_check", own.get("profile_check", "model"), PROFILE_CHECKS)
    args.lam = parse_lam(own.get("lam", 1.0))
    args.layers = parse_layers(own.get("layers"))
    args.mask = parse_mask(own.get("mask"))
    args.profile = own.get("profile") or None
    args.record_routing = own.get("record_routing") or None
    args.record_trace = own.get("record_trace") or None
    args.compression = own.get("compression") or None
    args.compression_params = comp
    if comp and not args.compression:
        raise FareError(f"compression parameters {sorted(comp)} given without compression=<method>")
    if args.intervention == "arr" and not args.profile:
        raise FareError("intervention=arr needs profile=<phi .safetensors file> (written by `fare profile`)")
    if args.intervention == "mask" and not args.mask:
        raise FareError("intervention=mask needs mask=layer:expert|layer:expert ...")
    only_for = {name: "arr" for name in ARR_ONLY} | {"mask": "mask"}
    for name, intervention in only_for.items():
        if args.intervention != intervention and own.get(name) not in (None, ""):
            raise FareError(f"{name}= is only used with intervention={intervention} "
                            f"(got intervention={args.intervention}); drop it or set intervention={intervention}")
    return args, kwargs


def init_arg_names(cls) -> set[str]:
    """Named parameters of ``cls.__init__`` and its bases (lm-eval's HFLM arguments)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                names.add(p.name)
    return names
