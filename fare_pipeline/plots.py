"""PNG plots of the pipeline's outputs (matplotlib, Agg canvas, no global backend state).

Byte-stable for the same inputs: the PNG carries no software/date metadata
(:func:`fare_analysis.plots.figure` / :func:`fare_analysis.plots.save_png`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fare_analysis.plots import figure as _figure
from fare_analysis.plots import save_png as _save


def _layer_ticks(layers: Sequence[int], most: int = 24) -> list[int]:
    """Ticks on layer ids only (every layer, or every k-th when there are more than ``most``)."""
    layers = [int(x) for x in layers]
    step = max(1, -(-len(layers) // most))
    return layers[::step]


def phi_heatmap(phi, layers: Sequence[int], path, title: str = "FSP sensitivity phi(e, l)"):
    """Layer x expert heatmap of phi (Eq. 4), at least 800 x 400 px; returns the Figure (saved to ``path``)."""
    phi = np.asarray(phi, dtype=np.float64)
    L, E = phi.shape
    fig = _figure(max(8.0, min(2 + 0.12 * E, 20)), max(4.0, min(1.5 + 0.3 * L, 14)))
    ax = fig.add_subplot()
    im = ax.imshow(phi, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    rows = list(range(L))[:: max(1, -(-L // 40))]
    ax.set_yticks(rows, [str(layers[i]) for i in rows])
    ax.set_xticks(list(range(E))[:: max(1, -(-E // 32))])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="phi")
    fig.tight_layout()
    _save(fig, path)
    return fig


def jsd_by_axis(jsd: Mapping[str, Sequence[float]], layers: Sequence[int], path,
                title: str = "Routing JSD (demographic vs neutral) by axis"):
    """Per-layer JSD (nats, Eq. 2) for each demographic axis; x ticks on layer ids. Returns the Figure."""
    fig = _figure(8, 4)
    ax = fig.add_subplot()
    for axis in sorted(jsd):
        ax.plot(list(layers), np.asarray(jsd[axis], dtype=np.float64), marker="o", label=axis)
    ax.set_xticks(_layer_ticks(layers))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("JSD (nats)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    return fig


def aals_ratio(result, path, title: str = "AALS fairness-efficiency ratio R(l)"):
    """Bar chart of R(l) (Eq. 5) with the quantile threshold; returns the Figure (saved to ``path``).

    Selected layers are red (legend entry names them); a dot marks every layer's value, so layers
    with R = 0 stay visible; a min_layers fallback selection is stated in the title.
    """
    layers, ratio = [int(x) for x in result.layers], np.asarray(result.ratio, dtype=np.float64)
    chosen = set(result.selected)
    fig = _figure(8, 4)
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    colors = ["tab:red" if layer in chosen else "tab:gray" for layer in layers]
    ax.bar(x, ratio, color=colors, edgecolor="black", linewidth=0.5)
    ax.scatter(x, ratio, c=colors, edgecolors="black", linewidths=0.5, s=16, zorder=3)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    line = ax.axhline(result.threshold, color="black", linestyle="--", linewidth=1,
                      label=f"q{result.quantile:g} threshold = {result.threshold:.3g}")
    from matplotlib.patches import Patch

    sel = Patch(facecolor="tab:red", edgecolor="black", label="selected: layer " + ", ".join(map(str, result.selected)))
    ticks = [i for i, layer in enumerate(layers) if layer in _layer_ticks(layers) or layer in chosen]
    ax.set_xticks(ticks, [f"{layers[i]}*" if layers[i] in chosen else str(layers[i]) for i in ticks])
    ax.set_xlabel("MoE layer (* = selected)")
    ax.set_ylabel("R(l)")
    if getattr(result, "fallback", False):
        title += f"\nfallback: no layer above the threshold; top-{len(result.selected)} R taken"
    ax.set_title(title)
    ax.legend(handles=[line, sel], fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return fig
