"""Profile controls and masking sets (SPEC section 7; paper Tables 2, 4, 5). Pure functions of phi.

Every transform takes ``phi`` [L, E] (torch or numpy), the decoder-layer id of each row and the
AALS-selected layer ids (default: all rows). Only the selected rows change; other rows come back
unchanged (ARR is applied on the selected layers only). ``valid`` [L, E] marks real experts
(padding never receives or contributes a value). Results are float64 torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

SCOPES = ("global", "layer")
RANDOM_METHODS = ("permute", "uniform")
DEFAULT_ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0)
DEFAULT_TOP_KS = (5, 10, 25, 50, 100)
DEFAULT_RANDOM_SEEDS = (0, 1, 2, 3, 4)


def _prep(phi, layers, selected, valid):
    arr = (phi.detach().cpu().double().numpy() if isinstance(phi, torch.Tensor) else np.asarray(phi, np.float64)).copy()
    if arr.ndim != 2:
        raise ValueError(f"phi must be [L, E]; got shape {arr.shape}")
    L, E = arr.shape
    ids = list(range(L)) if layers is None else [int(x) for x in layers]
    if len(ids) != L:
        raise ValueError(f"layers names {len(ids)} rows; phi has {L}")
    if selected is None:
        rows = list(range(L))
    else:
        bad = [s for s in selected if int(s) not in ids]
        if bad:
            raise ValueError(f"selected layer {bad[0]} is not a profile row; allowed: {ids}")
        rows = sorted({ids.index(int(s)) for s in selected})
    if not rows:
        raise ValueError("no selected layers: controls need at least one profile row")
    ok = np.ones((L, E), bool) if valid is None else np.asarray(valid, bool)
    if ok.shape != (L, E):
        raise ValueError(f"valid must be [L, E] = [{L}, {E}]; got {ok.shape}")
    sel = np.zeros((L, E), bool)
    sel[rows] = True
    return arr, ids, rows, sel & ok


def _out(arr) -> torch.Tensor:
    return torch.from_numpy(arr)


def flatten(phi, layers=None, selected=None, *, scope: str = "global", valid=None) -> torch.Tensor:
    """Every selected expert gets the mean phi (over all selected experts, or per layer)."""
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}; allowed: {', '.join(SCOPES)}")
    arr, _, rows, m = _prep(phi, layers, selected, valid)
    if scope == "global":
        arr[m] = arr[m].mean()
    else:
        for r in rows:
            arr[r, m[r]] = arr[r, m[r]].mean()
    return _out(arr)


def inverted(phi, layers=None, selected=None, *, scope: str = "global", valid=None) -> torch.Tensor:
    """phi_max - phi over the selected experts (max over all of them, or per layer)."""
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}; allowed: {', '.join(SCOPES)}")
    arr, _, rows, m = _prep(phi, layers, selected, valid)
    if scope == "global":
        arr[m] = arr[m].max() - arr[m]
    else:
        for r in rows:
            arr[r, m[r]] = arr[r, m[r]].max() - arr[r, m[r]]
    return _out(arr)


def power(phi, alpha: float, layers=None, selected=None, *, valid=None) -> torch.Tensor:
    """phi ** alpha on the selected experts (phi >= 0)."""
    if not (isinstance(alpha, (int, float)) and alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"alpha={alpha!r}; must be a finite number > 0")
    arr, _, _, m = _prep(phi, layers, selected, valid)
    if np.any(arr[m] < 0):
        raise ValueError("power control needs phi >= 0")
    arr[m] = arr[m] ** alpha
    return _out(arr)


def _ranked(arr, m, ids):
    """(row, expert) of the selected experts by descending phi; ties -> lower layer id, then expert."""
    cells = [(r, e) for r, e in zip(*np.nonzero(m))]
    return sorted(cells, key=lambda c: (-arr[c], ids[c[0]], c[1]))


def top_k(phi, k: int, layers=None, selected=None, *, valid=None) -> torch.Tensor:
    """Keep the k largest phi over all selected layers, zero the rest (k > available keeps all)."""
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k={k!r}; must be a positive integer")
    arr, ids, _, m = _prep(phi, layers, selected, valid)
    keep = set(_ranked(arr, m, ids)[:k])
    for r, e in zip(*np.nonzero(m)):
        if (r, e) not in keep:
            arr[r, e] = 0.0
    return _out(arr)


def random_profile(phi, seed: int, layers=None, selected=None, *, method: str = "permute", valid=None) -> torch.Tensor:
    """A random profile: phi values permuted among each selected layer's experts (``permute``,
    keeps each layer's value distribution) or U(min phi, max phi) draws (``uniform``)."""
    if method not in RANDOM_METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(RANDOM_METHODS)}")
    arr, _, rows, m = _prep(phi, layers, selected, valid)
    rng = np.random.default_rng(seed)
    lo, hi = arr[m].min(), arr[m].max()
    for r in rows:
        vals = arr[r, m[r]]
        arr[r, m[r]] = rng.permutation(vals) if method == "permute" else rng.uniform(lo, hi, vals.size)
    return _out(arr)


@dataclass
class Control:
    name: str  # e.g. "fsp", "flatten", "random", "inverted", "power", "top_k"
    params: dict
    phi: torch.Tensor
    group: str = ""  # conditions averaged together (the random seeds) share a group
    meta: dict = field(default_factory=dict)


def control_suite(
    phi,
    layers=None,
    selected=None,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    ks: Sequence[int] = DEFAULT_TOP_KS,
    random_seeds: Sequence[int] = DEFAULT_RANDOM_SEEDS,
    random_method: str = "permute",
    scope: str = "global",
    valid=None,
) -> list[Control]:
    """The paper's Table 4 conditions: flatten, random (one per seed, averaged as group
    ``random``), inverted, power alpha (alpha = 1 is FSP itself) and top-k."""
    out = [Control("flatten", {"scope": scope}, flatten(phi, layers, selected, scope=scope, valid=valid), "flatten")]
    for s in random_seeds:
        out.append(Control("random", {"seed": int(s), "method": random_method},
                           random_profile(phi, int(s), layers, selected, method=random_method, valid=valid), "random"))
    out.append(Control("inverted", {"scope": scope}, inverted(phi, layers, selected, scope=scope, valid=valid), "inverted"))
    for a in alphas:
        out.append(Control("power", {"alpha": float(a)}, power(phi, float(a), layers, selected, valid=valid), f"power_{a:g}"))
    _, ids, _, m = _prep(phi, layers, selected, valid)
    for k in ks:
        out.append(Control("top_k", {"k": int(k)}, top_k(phi, int(k), layers, selected, valid=valid), f"top_{k}",
                           {"effective_k": min(int(k), int(m.sum()))}))
    return out


def mask_sets(phi, layers=None, selected=None, *, n: int = 10, random_draws: int = 5, seed: int = 0,
              valid=None) -> dict:
    """Group-masking sets (Table 2): ``top`` / ``bottom`` n experts by phi and ``random`` draws of
    n experts (to be averaged), as (decoder-layer id, expert) pairs over the selected layers."""
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n={n!r}; must be a positive integer")
    arr, ids, _, m = _prep(phi, layers, selected, valid)
    ranked = _ranked(arr, m, ids)
    if n > len(ranked):
        raise ValueError(f"n={n} experts requested; only {len(ranked)} selected experts exist")
    as_pairs = lambda cells: sorted((ids[r], int(e)) for r, e in cells)  # noqa: E731
    bottom = sorted(ranked, key=lambda c: (arr[c], ids[c[0]], c[1]))[:n]
    rng = np.random.default_rng(seed)
    draws = [as_pairs([ranked[i] for i in rng.choice(len(ranked), size=n, replace=False)]) for _ in range(random_draws)]
    return {"top": as_pairs(ranked[:n]), "bottom": as_pairs(bottom), "random": draws, "n": n, "seed": seed}
