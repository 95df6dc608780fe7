"""AALS layer selection (SPEC section 4, paper Eq. 5) and the operating point lambda* (Eq. 7).

Pure functions of already measured numbers; the probes that produce them live elsewhere.

* ``R(l) = delta_bias(l) / (|delta_PPL(l)| + eps)``, with
  ``delta_bias(l) = |pref_base - 0.5| - |pref_l - 0.5|`` and ``delta_PPL(l) = PPL_l - PPL_base``;
  layers whose R(l) exceeds the 75th percentile (linear interpolation) are selected.
* ``lambda* = argmin |CrowS_pref(lambda) - 0.5|`` over the grid subject to
  ``PPL(lambda) <= (1 + beta) * PPL_base``. No feasible point is a reported outcome, not an error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

DEFAULT_QUANTILE = 0.75
DEFAULT_EPS = 1e-6
DEFAULT_LAMBDA_GRID = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
PARITY = 0.5


def _finite(name: str, values, n: int | None = None) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if n is not None and arr.size != n:
        raise ValueError(f"{name} has {arr.size} values; expected {n} (one per layer / grid point)")
    bad = arr[~np.isfinite(arr)]
    if bad.size:
        raise ValueError(f"{name} contains {float(bad[0])!r}; only finite numbers are allowed")
    return arr


def delta_bias(pref_base: float, pref: float | Sequence[float], target: float = PARITY) -> np.ndarray:
    """Bias reduction |pref_base - target| - |pref - target| (positive = closer to parity)."""
    return abs(float(pref_base) - target) - np.abs(np.asarray(pref, dtype=np.float64) - target)


# --------------------------------------------------------------------------- AALS (Eq. 5)


@dataclass(frozen=True)
class AALSResult:
    layers: list[int]
    delta_bias: list[float]
    delta_ppl: list[float]
    ratio: list[float]  # R(l)
    threshold: float  # the quantile of R
    selected: list[int]  # layer ids, ascending
    quantile: float
    eps: float
    min_layers: int
    fallback: bool  # True when fewer than min_layers exceeded the threshold and the top-R layers were taken

    def to_dict(self) -> dict:
        return asdict(self)


def aals_select(
    layers: Sequence[int],
    delta_bias: Sequence[float],
    delta_ppl: Sequence[float],
    *,
    quantile: float = DEFAULT_QUANTILE,
    eps: float = DEFAULT_EPS,
    min_layers: int = 1,
) -> AALSResult:
    """Score layers by R(l) (Eq. 5) and keep those strictly above the ``quantile`` of R.

    ``min_layers`` (default 1; 0 disables) guarantees a non-empty selection when R ties (e.g.
    all layers equal): the ``min_layers`` largest R are then taken, ties to the lower layer.
    """
    ids = [int(x) for x in layers]
    if not ids:
        raise ValueError("aals_select needs at least one layer")
    if len(set(ids)) != len(ids):
        raise ValueError(f"layers must be distinct; got {ids}")
    db = _finite("delta_bias", delta_bias, len(ids))
    dp = _finite("delta_ppl", delta_ppl, len(ids))
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile={quantile!r}; must lie in [0, 1]")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps={eps!r}; must be a finite number > 0")
    if not (isinstance(min_layers, int) and 0 <= min_layers <= len(ids)):
        raise ValueError(f"min_layers={min_layers!r}; allowed: an int in [0, {len(ids)}]")
    ratio = db / (np.abs(dp) + eps)
    threshold = float(np.quantile(ratio, quantile))
    chosen = [i for i in range(len(ids)) if ratio[i] > threshold]
    fallback = len(chosen) < min_layers
    if fallback:
        chosen = sorted(range(len(ids)), key=lambda i: (-ratio[i], ids[i]))[:min_layers]
    return AALSResult(
        layers=ids, delta_bias=db.tolist(), delta_ppl=dp.tolist(), ratio=ratio.tolist(), threshold=threshold,
        selected=sorted(ids[i] for i in chosen), quantile=float(quantile), eps=float(eps), min_layers=min_layers,
        fallback=fallback,
    )


def aals_from_probes(
    layers: Sequence[int],
    pref_base: float,
    ppl_base: float,
    pref_layers: Sequence[float],
    ppl_layers: Sequence[float],
    *,
    target: float = PARITY,
    **kwargs,
) -> AALSResult:
    """AALS from raw probe measurements: CrowS preference and PPL per probed layer and at base."""
    n = len(list(layers))
    pref = _finite("pref_layers", pref_layers, n)
    ppl = _finite("ppl_layers", ppl_layers, n)
    return aals_select(layers, delta_bias(pref_base, pref, target), ppl - float(ppl_base), **kwargs)


# --------------------------------------------------------------------------- lambda* (Eq. 7)


@dataclass(frozen=True)
class OperatingPoint:
    lambda_star: float | None  # None when no grid point meets the budget
    feasible: bool
    reason: str
    budget: float  # (1 + beta) * ppl_base
    beta: float
    ppl_base: float
    target: float
    grid: list[dict]  # one row per grid point: lambda, pref, ppl, gap, feasible, selected

    def to_dict(self) -> dict:
        return asdict(self)


def select_lambda(
    lambdas: Sequence[float],
    prefs: Sequence[float],
    ppls: Sequence[float],
    *,
    ppl_base: float,
    beta: float = 1.0,
    target: float = PARITY,
    lambda_max: float | None = None,
    tol: float = 1e-12,
) -> OperatingPoint:
    """Eq. 7: the feasible grid point closest to preference parity; ties -> the smallest lambda.

    Grid points above ``lambda_max`` are ignored. ``beta`` is the allowed relative PPL increase
    (the paper used beta <= 1.0) and must be >= 0.
    """
    lam = _finite("lambdas", lambdas)
    n = lam.size
    if n == 0:
        raise ValueError("lambda grid is empty")
    pref = _finite("prefs", prefs, n)
    ppl = _finite("ppls", ppls, n)
    if np.any(lam < 0):
        raise ValueError(f"lambda={float(lam[lam < 0][0])!r} in the grid; allowed: lambda >= 0")
    if len(set(lam.tolist())) != n:
        raise ValueError("lambda grid has duplicate values")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta={beta!r}; the perplexity budget must be a finite number >= 0")
    if not (math.isfinite(ppl_base) and ppl_base > 0):
        raise ValueError(f"ppl_base={ppl_base!r}; must be a finite number > 0")
    if lambda_max is not None and not (math.isfinite(lambda_max) and lambda_max >= 0):
        raise ValueError(f"lambda_max={lambda_max!r}; must be a finite number >= 0")
    budget = (1.0 + beta) * ppl_base
    in_range = lam <= lambda_max if lambda_max is not None else np.ones(n, bool)
    ok = in_range & (ppl <= budget)
    gap = np.abs(pref - target)
    best = None
    for i in sorted(np.flatnonzero(ok), key=lambda i: lam[i]):
        if best is None or gap[i] < gap[best] - tol:
            best = i
    rows = [
        {"lambda": float(lam[i]), "pref": float(pref[i]), "ppl": float(ppl[i]), "gap": float(gap[i]),
         "in_range": bool(in_range[i]), "feasible": bool(ok[i]), "selected": bool(best is not None and i == best)}
        for i in np.argsort(lam, kind="mergesort")
    ]
    if best is None:
        if not in_range.any():
            reason = f"no grid point has lambda <= lambda_max={lambda_max}"
        else:
            j = int(np.flatnonzero(in_range)[np.argmin(ppl[in_range])])
            reason = (f"no grid point meets PPL <= (1 + beta) * PPL_base = {budget:.6g}; "
                      f"lowest PPL {ppl[j]:.6g} at lambda={lam[j]:g}")
        return OperatingPoint(None, False, reason, budget, float(beta), float(ppl_base), target, rows)
    reason = f"lambda*={lam[best]:g}: |pref - {target:g}| = {gap[best]:.6g} with PPL {ppl[best]:.6g} <= {budget:.6g}"
    return OperatingPoint(float(lam[best]), True, reason, budget, float(beta), float(ppl_base), target, rows)


# --------------------------------------------------------------------------- outputs


def write_aals(result: AALSResult, out_dir, *, plot: bool = True) -> list:
    """``aals.csv``/``aals.md`` (one row per layer), ``aals.json`` (everything), ``aals.png``."""
    import json
    from pathlib import Path

    from .tables import write_table

    out = Path(out_dir)
    rows = [{"layer": l, "delta_bias": b, "delta_ppl": p, "R": r, "selected": l in result.selected}
            for l, b, p, r in zip(result.layers, result.delta_bias, result.delta_ppl, result.ratio)]
    paths = list(write_table(rows, out / "aals", title=f"AALS R(l), q={result.quantile:g}, "
                             f"threshold {result.threshold:.4g}" + fallback_note(result), digits=4))
    (out / "aals.json").write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n")
    paths.append(out / "aals.json")
    if plot:
        from .plots import aals_ratio

        aals_ratio(result, out / "aals.png")
        paths.append(out / "aals.png")
    return paths


def fallback_note(result) -> str:
    """``"; fallback: ..."`` when no layer's R exceeded the threshold and min_layers picked the top R, else ``""``."""
    if not result.fallback:
        return ""
    return (f"; fallback: no layer's R exceeded the q{result.quantile:g} threshold, so the top-{len(result.selected)} "
            f"R layer(s) {result.selected} were taken (min_layers={result.min_layers})")


def write_operating_point(op: OperatingPoint, out_dir) -> list:
    """``lambda_grid.csv``/``.md`` (whole grid) and ``lambda_star.json``."""
    import json
    from pathlib import Path

    from .tables import write_table

    out = Path(out_dir)
    paths = list(write_table(op.grid, out / "lambda_grid", digits=4,
                             title=f"lambda grid (beta={op.beta:g}, budget PPL <= {op.budget:.4g})"))
    (out / "lambda_star.json").write_text(json.dumps(op.to_dict(), indent=2, sort_keys=True) + "\n")
    return paths + [out / "lambda_star.json"]
