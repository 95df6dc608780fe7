"""fare_pipeline.plots write valid, byte-stable PNGs."""

import numpy as np

from fare_pipeline import plots
from fare_pipeline.aals import aals_select

PNG = b"\x89PNG\r\n\x1a\n"


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
