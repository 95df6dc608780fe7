"""PNG plots of the study-level comparisons (matplotlib Agg canvas, no global backend state).

Byte-stable for the same inputs: the PNG carries no software/date metadata.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_META = {"Software": None}


def figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path) -> Path:
    """Write ``fig`` as PNG without software/date metadata (same inputs, same bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata=_META)
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, max(n, 1))
    return math.ceil(max(n, 1) / cols), cols


def delta_vs_p(points: Sequence[dict], metrics: Sequence[str], path) -> Path:
    """One panel per metric: Δ(p) of each method (line) with its 95% CI as error bars.

    ``points``: dicts with group, metric, p, delta, ci_low, ci_high.
    """
    rows, cols = _grid(len(metrics))
    fig = figure(4.2 * cols, 3.2 * rows)
    by_metric = defaultdict(lambda: defaultdict(list))
    for pt in points:
        if pt["p"] is not None and pt["delta"] is not None:
            by_metric[pt["metric"]][pt["group"]].append(pt)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        for group in sorted(by_metric[metric]):
            pts = sorted(by_metric[metric][group], key=lambda q: q["p"])
            x = np.array([q["p"] for q in pts], dtype=float)
            y = np.array([q["delta"] for q in pts], dtype=float)
            lo = np.array([q["ci_low"] if q["ci_low"] is not None else q["delta"] for q in pts], dtype=float)
            hi = np.array([q["ci_high"] if q["ci_high"] is not None else q["delta"] for q in pts], dtype=float)
            ax.errorbar(x, y, yerr=[np.maximum(y - lo, 0), np.maximum(hi - y, 0)], marker="o", capsize=3,
                        label=group)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("safety proportion p")
        ax.set_ylabel("Δ vs baseline")
        if by_metric[metric]:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no Δ at any p for this metric", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
    fig.suptitle("Metric Δ vs safety-data proportion p (95% CI)")
    fig.tight_layout()
    return save_png(fig, path)


def delta_vs_drift(points: Sequence[dict], path) -> Path:
    """Scatter of benchmark Δ (y) against the run's drift score (x), one marker series per metric.

    ``points``: dicts with metric, drift, delta.
    """
    fig = figure(6.5, 4.5)
    ax = fig.add_subplot()
    by_metric = defaultdict(list)
    for pt in points:
        if pt["drift"] is not None and pt["delta"] is not None and math.isfinite(pt["drift"]):
            by_metric[pt["metric"]].append(pt)
    markers = "osD^v<>Px*"
    for i, metric in enumerate(sorted(by_metric)):
        pts = by_metric[metric]
        ax.scatter([q["drift"] for q in pts], [q["delta"] for q in pts], marker=markers[i % len(markers)],
                   label=metric, alpha=0.8)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("drift score (flip rate, mean over tasks)")
    ax.set_ylabel("benchmark Δ vs baseline")
    ax.set_title("Benchmark Δ vs prompt-matched drift (one point per run x metric)")
    if by_metric:
        ax.legend(fontsize=6)
    fig.tight_layout()
    return save_png(fig, path)


def heatmap(rows: Sequence[str], cols: Sequence[str], values, labels, path,
            title: str = "Methods x metrics: mean Δ / CI half-width") -> Path:
    """Diverging heatmap (rows x cols), cells annotated with ``labels`` (e.g. the mean Δ)."""
    v = np.asarray(values, dtype=float).reshape(len(rows), len(cols))
    finite = v[np.isfinite(v)]
    lim = float(np.max(np.abs(finite))) if finite.size else 1.0
    fig = figure(min(2.5 + 1.1 * len(cols), 22), min(1.5 + 0.45 * len(rows), 16))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(v), cmap="RdBu_r", vmin=-lim or -1, vmax=lim or 1, aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(range(len(cols)), list(cols), rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), list(rows), fontsize=7)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if labels[i][j]:
                ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return save_png(fig, path)


def aals_curves(curves: Sequence[tuple], path) -> Path:
    """FARE Fig. 3: AALS ratio R(l) (Eq. 5) of every model in one figure; selected layers filled.

    ``curves``: (model, layers, ratio, selected) per model.
    """
    fig = figure(7.5, 4)
    ax = fig.add_subplot()
    for model, layers, ratio, selected in curves:
        (line,) = ax.plot(layers, ratio, marker="o", markerfacecolor="none", label=model)
        sel = [(layer, r) for layer, r in zip(layers, ratio) if layer in set(selected)]
        if sel:
            ax.plot(*zip(*sel), linestyle="none", marker="o", color=line.get_color())
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("R(l)")
    ax.set_title("AALS layer sensitivity R(l) across models (filled = selected)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)
