"""PNG plots of the pipeline's outputs (matplotlib, Agg canvas, no global backend state).

Byte-stable for the same inputs: the PNG carries no software/date metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

_META = {"Software": None}


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is a declared dependency
        raise RuntimeError("plots need matplotlib (pip install matplotlib)") from e
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata=_META)
    return path


def phi_heatmap(phi, layers: Sequence[int], path, title: str = "FSP sensitivity phi(e, l)") -> Path:
    """Layer x expert heatmap of phi (Eq. 4)."""
    phi = np.asarray(phi, dtype=np.float64)
    L, E = phi.shape
    fig = _figure(min(2 + 0.12 * E, 20), min(1.5 + 0.3 * L, 14))
    ax = fig.add_subplot()
    im = ax.imshow(phi, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(L), [str(x) for x in layers])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="phi")
    fig.tight_layout()
    return _save(fig, path)


def jsd_by_axis(jsd: Mapping[str, Sequence[float]], layers: Sequence[int], path,
                title: str = "Routing JSD (demographic vs neutral) by axis") -> Path:
    """Per-layer JSD (nats, Eq. 2) for each demographic axis."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    for axis in sorted(jsd):
        ax.plot(list(layers), np.asarray(jsd[axis], dtype=np.float64), marker="o", label=axis)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("JSD (nats)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def aals_ratio(result, path, title: str = "AALS fairness-efficiency ratio R(l)") -> Path:
    """Bar chart of R(l) (Eq. 5) with the quantile threshold; selected layers highlighted."""
    layers, ratio = list(result.layers), np.asarray(result.ratio, dtype=np.float64)
    fig = _figure(7, 3.5)
    ax = fig.add_subplot()
    colors = ["tab:red" if layer in set(result.selected) else "tab:gray" for layer in layers]
    ax.bar([str(x) for x in layers], ratio, color=colors)
    ax.axhline(result.threshold, color="black", linestyle="--", linewidth=1,
               label=f"q{result.quantile:g} = {result.threshold:.3g}")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("R(l)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
