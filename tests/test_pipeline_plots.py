"""fare_pipeline.plots write valid, byte-stable PNGs that show what they claim (issue 11 "Plots")."""

import struct

import numpy as np
from matplotlib.colors import to_rgba

from fare_pipeline import plots
from fare_pipeline.aals import aals_select

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head.startswith(PNG) and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plots_are_png_and_stable(tmp_path):
    phi = np.arange(24, dtype=float).reshape(3, 8) / 24
    r = aals_select([1, 2, 3], [0.01, 0.03, 0.02], [0.1, 0.1, 0.1])
    for sub in ("a", "b"):
        plots.phi_heatmap(phi, [1, 2, 3], tmp_path / sub / "phi.png")
        plots.jsd_by_axis({"gender": [0.1, 0.2, 0.1], "race": [0.05, 0.1, 0.3]}, [1, 2, 3], tmp_path / sub / "jsd.png")
        plots.aals_ratio(r, tmp_path / sub / "aals.png")
    for name in ("phi.png", "jsd.png", "aals.png"):
        a = (tmp_path / "a" / name).read_bytes()
        assert a.startswith(PNG) and len(a) > 1000
        assert a == (tmp_path / "b" / name).read_bytes()


def test_aals_plot_marks_selected_layers_and_zero_bars(tmp_path):
    # R = delta_bias / (|delta_ppl| + eps): layer 4 has R = 0 exactly, layer 6 the largest R
    r = aals_select([0, 2, 4, 6], [0.01, -0.02, 0.0, 0.05], [0.1, 0.1, 0.1, 0.1])
    assert r.selected == [6] and r.ratio[2] == 0.0 and not r.fallback
    fig = plots.aals_ratio(r, tmp_path / "aals.png")
    ax = fig.axes[0]
    bars = ax.patches
    assert [round(b.get_height(), 9) for b in bars] == [round(x, 9) for x in r.ratio]
    red = to_rgba("tab:red")
    assert [b.get_facecolor() == red for b in bars] == [False, False, False, True]  # only the selected layer
    # every layer's value is drawn as a point, so the R = 0 bar (zero height) is still visible
    dots = [c for c in ax.collections if len(c.get_offsets()) == 4]
    assert dots and np.allclose(np.asarray(dots[0].get_offsets())[:, 1], r.ratio)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "selected: layer 6" in legend and any(t.startswith("q0.75 threshold") for t in legend)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "2", "4", "6*"]
    assert "fallback" not in ax.get_title()
    # no layer above the threshold: min_layers takes the top R, and the plot says so
    tie = aals_select([0, 1, 2], [0.0, 0.0, 0.0], [0.1, 0.1, 0.1])
    assert tie.fallback and tie.selected == [0]
    title = plots.aals_ratio(tie, tmp_path / "tie.png").axes[0].get_title()
    assert "fallback: no layer above the threshold; top-1 R taken" in title


def test_jsd_ticks_on_layers_and_heatmap_width(tmp_path):
    layers = [1, 3, 5, 7, 9]  # MoE layers that are not consecutive integers
    fig = plots.jsd_by_axis({"age": [0.1, 0.2, 0.1, 0.0, 0.3]}, layers, tmp_path / "jsd.png")
    ticks = fig.axes[0].get_xticks()
    assert len(ticks) and set(ticks.tolist()) <= set(layers)
    many = list(range(0, 96, 2))  # 48 MoE layers: ticks thin out but stay on layers
    fig = plots.jsd_by_axis({"age": np.zeros(48)}, many, tmp_path / "jsd48.png")
    ticks = fig.axes[0].get_xticks().tolist()
    assert 10 <= len(ticks) <= 24 and set(ticks) <= set(many)
    plots.phi_heatmap(np.random.default_rng(0).random((4, 8)), [0, 1, 2, 3], tmp_path / "phi.png")
    width, height = _png_size(tmp_path / "phi.png")
    assert width >= 800 and height >= 400
    plots.phi_heatmap(np.zeros((16, 64)), list(range(16)), tmp_path / "phi64.png")
    assert _png_size(tmp_path / "phi64.png")[0] >= 800
