"""Instability of a method across the safety-data proportion p (SPEC section 12).

For one model x method x setting (method parameters other than p) and one metric, with Δ(p) the
paired difference to the model's dense baseline and [lo(p), hi(p)] its 95% CI:

* range       = max_p Δ(p) − min_p Δ(p)
* sd          = population standard deviation of Δ(p) over the p values run (ddof=0: it describes
                the p values that were run, it does not estimate a wider population)
* max_abs     = max_p |Δ(p)|
* half_width  = pooled CI half-width, the root mean square of (hi(p) − lo(p)) / 2 over p
                (pooling like variances, so one wide CI does not hide behind narrow ones)
* range_norm  = range / half_width (range in units of the metric's own CI half-width)

A method's instability (one row per model x method x setting) is the mean over metrics of
``range_norm`` (so that noisy metrics do not dominate), reported beside the raw mean range and
the largest |Δ|. Only settings run at two or more p values have an instability.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np


def metric_instability(points: Sequence[dict]) -> dict:
    """Range, sd, max |Δ|, pooled CI half-width and normalised range of one metric over p.

    ``points``: dicts with p, delta, ci_low, ci_high (one per p; NaN deltas are ignored).
    """
    pts = [q for q in points if q["delta"] is not None and math.isfinite(q["delta"])]
    ps = sorted({q["p"] for q in pts})
    if len(pts) != len(ps):
        raise ValueError(f"several runs share a safety proportion p in one setting: {sorted(q['p'] for q in pts)}")
    d = np.array([q["delta"] for q in pts], dtype=float)
    hw = np.array([(q["ci_high"] - q["ci_low"]) / 2 for q in pts
                   if q.get("ci_low") is not None and q.get("ci_high") is not None
                   and math.isfinite(q["ci_low"]) and math.isfinite(q["ci_high"])], dtype=float)
    out = {"n_p": len(ps), "p_values": ps, "range": math.nan, "sd": math.nan, "max_abs": math.nan,
           "half_width": math.nan, "range_norm": math.nan}
    if len(ps) < 2:
        return out
    out.update(range=float(d.max() - d.min()), sd=float(d.std(ddof=0)), max_abs=float(np.abs(d).max()))
    if hw.size == len(pts):
        out["half_width"] = float(np.sqrt(np.mean(hw ** 2)))
        if out["half_width"] > 0:
            out["range_norm"] = out["range"] / out["half_width"]
    return out


def instability_tables(cells: Iterable[dict], metrics: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """Per-metric rows and per-setting summary rows from leaderboard cells.

    ``cells``: dicts with group (model x method x setting label), model, method, setting, p, metric,
    delta, ci_low, ci_high. Returns (per_metric, summary); settings with fewer than two p values
    are left out of both.
    """
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    info: dict[str, dict] = {}
    for c in cells:
        if c.get("p") is None:
            continue
        groups[c["group"]][c["metric"]].append(c)
        info[c["group"]] = {k: c[k] for k in ("model", "method", "setting")}
    per_metric, summary = [], []
    for group in sorted(groups):
        rows = []
        for metric in metrics:
            if metric in groups[group]:
                stats = metric_instability(groups[group][metric])
                if stats["n_p"] >= 2:
                    rows.append({"group": group, **info[group], "metric": metric, **stats})
        if not rows:
            continue
        per_metric += rows
        norm = [r["range_norm"] for r in rows if math.isfinite(r["range_norm"])]
        summary.append({
            "group": group, **info[group], "n_p": max(r["n_p"] for r in rows),
            "p_values": sorted({p for r in rows for p in r["p_values"]}), "n_metrics": len(rows),
            "mean_range": float(np.mean([r["range"] for r in rows])),
            "mean_sd": float(np.mean([r["sd"] for r in rows])),
            "max_abs_delta": float(max(r["max_abs"] for r in rows)),
            "instability": float(np.mean(norm)) if norm else math.nan,
        })
    return per_metric, summary
