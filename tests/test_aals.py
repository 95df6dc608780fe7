"""fare_pipeline.aals: Eq. 5 layer selection and Eq. 7 operating point, hand-worked."""

import statistics

import numpy as np
import pytest

from fare_pipeline.aals import aals_from_probes, aals_select, delta_bias, select_lambda


def test_delta_bias_by_hand():
    # base .68 -> .18 from parity; probe .60 -> .10: reduction .08 ; probe .30 -> .20: -.02
    np.testing.assert_allclose(delta_bias(0.68, [0.60, 0.30, 0.68]), [0.08, -0.02, 0.0], atol=1e-15)


def test_aals_ratio_and_quantile_by_hand():
    layers = [0, 1, 2, 3]
    db = [0.02, 0.04, 0.01, 0.03]
    dp = [0.5, -1.0, 0.1, 0.25]  # |dPPL| is used: a PPL drop also counts as cost
    r = aals_select(layers, db, dp)
    want = [0.02 / (0.5 + 1e-6), 0.04 / (1.0 + 1e-6), 0.01 / (0.1 + 1e-6), 0.03 / (0.25 + 1e-6)]
    np.testing.assert_allclose(r.ratio, want, rtol=1e-12)
    # 75th percentile, linear interpolation == statistics.quantiles(method="inclusive")
    assert r.threshold == pytest.approx(statistics.quantiles(want, n=4, method="inclusive")[2], rel=1e-12)
    assert r.selected == [3] and not r.fallback


def test_aals_from_probes_sixteen_layers():
    rng = np.random.default_rng(0)
    pref = 0.68 - rng.uniform(0, 0.05, 16)
    ppl = 20 + rng.uniform(0.1, 3, 16)
    r = aals_from_probes(range(16), 0.68, 20.0, pref, ppl, quantile=0.5)
    ratio = (0.18 - np.abs(pref - 0.5)) / (np.abs(ppl - 20.0) + 1e-6)
    med = statistics.quantiles(ratio.tolist(), n=2, method="inclusive")[0]
    assert r.selected == [i for i in range(16) if ratio[i] > med] and len(r.selected) == 8


def test_aals_ties_fallback_and_errors():
    r = aals_select([4, 5, 6], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    assert r.fallback and r.selected == [4]
    assert aals_select([4, 5, 6], [0.0] * 3, [1.0] * 3, min_layers=0).selected == []
    with pytest.raises(ValueError, match="quantile=1.5"):
        aals_select([0, 1], [0, 0], [1, 1], quantile=1.5)
    with pytest.raises(ValueError, match="delta_ppl has 1 values; expected 2"):
        aals_select([0, 1], [0, 0], [1])
    with pytest.raises(ValueError, match="delta_bias contains nan"):
        aals_select([0, 1], [0, float("nan")], [1, 1])


def test_select_lambda_by_hand():
    lam = [0.0, 0.5, 1.0, 2.0, 3.0]
    pref = [0.68, 0.62, 0.55, 0.51, 0.49]
    ppl = [10.0, 11.0, 14.0, 19.0, 25.0]
    op = select_lambda(lam, pref, ppl, ppl_base=10.0, beta=1.0)  # budget 20: lambda=3 infeasible
    assert op.feasible and op.lambda_star == 2.0 and op.budget == 20.0
    assert [row["feasible"] for row in op.grid] == [True, True, True, True, False]
    assert sum(row["selected"] for row in op.grid) == 1
    # tighter budget
    assert select_lambda(lam, pref, ppl, ppl_base=10.0, beta=0.4).lambda_star == 1.0
    # lambda_max restricts the grid
    assert select_lambda(lam, pref, ppl, ppl_base=10.0, lambda_max=0.75).lambda_star == 0.5
    # ties in |pref - .5| -> smallest lambda
    assert select_lambda([2.0, 1.0], [0.52, 0.48], [10.0, 10.0], ppl_base=10.0).lambda_star == 1.0


def test_select_lambda_no_feasible_point_is_reported():
    op = select_lambda([0.5, 1.0], [0.6, 0.5], [30.0, 40.0], ppl_base=10.0, beta=0.5)
    assert not op.feasible and op.lambda_star is None
    assert "no grid point meets PPL" in op.reason and "lambda=0.5" in op.reason
    assert op.to_dict()["grid"][0]["feasible"] is False


def test_select_lambda_bad_input():
    with pytest.raises(ValueError, match="beta=-0.1; the perplexity budget must be a finite number >= 0"):
        select_lambda([0.0], [0.6], [10.0], ppl_base=10.0, beta=-0.1)
    with pytest.raises(ValueError, match="lambda=-1.0"):
        select_lambda([-1.0, 0.0], [0.6, 0.6], [10.0, 10.0], ppl_base=10.0)
    with pytest.raises(ValueError, match="ppls has 1 values; expected 2"):
        select_lambda([0.0, 1.0], [0.6, 0.6], [10.0], ppl_base=10.0)


def test_outputs_written(tmp_path):
    from fare_pipeline.aals import write_aals, write_operating_point

    r = aals_select([0, 1, 2, 3], [0.02, 0.04, 0.01, 0.03], [0.5, -1.0, 0.1, 0.25])
    paths = write_aals(r, tmp_path, plot=False)
    csv_rows = (tmp_path / "aals.csv").read_text().splitlines()
    assert csv_rows[0] == "layer,delta_bias,delta_ppl,R,selected" and csv_rows[4].endswith(",True")
    assert "| 3 | 0.0300 | 0.2500 | 0.1200 | yes |" in (tmp_path / "aals.md").read_text()
    assert len(paths) == 3
    op = select_lambda([0.5, 1.0], [0.6, 0.5], [30.0, 40.0], ppl_base=10.0, beta=0.5)
    write_operating_point(op, tmp_path)
    import json

    assert json.loads((tmp_path / "lambda_star.json").read_text())["lambda_star"] is None
    assert (tmp_path / "lambda_grid.csv").read_text().splitlines()[0] == "lambda,pref,ppl,gap,in_range,feasible,selected"


def test_fallback_is_stated_in_aals_md_and_png(tmp_path):
    from fare_pipeline.aals import write_aals

    # every R(l) equal (0): nothing exceeds the 75th percentile, min_layers=1 takes the first top-R layer
    r = aals_select([0, 1, 2, 3], [0.0, 0.0, 0.0, 0.0], [0.2, 0.1, 0.3, 0.4])
    assert r.fallback and r.selected == [0] and r.threshold == 0.0
    write_aals(r, tmp_path / "fb", plot=True)
    title = (tmp_path / "fb" / "aals.md").read_text().splitlines()[0]
    assert "fallback: no layer's R exceeded the q0.75 threshold, so the top-1 R layer(s) [0] were taken" in title
    assert (tmp_path / "fb" / "aals.png").read_bytes().startswith(b"\x89PNG")
    # a regular selection has no such note
    ok = aals_select([0, 1, 2, 3], [0.02, 0.04, 0.01, 0.03], [0.5, -1.0, 0.1, 0.25])
    write_aals(ok, tmp_path / "ok", plot=False)
    assert not ok.fallback and "fallback" not in (tmp_path / "ok" / "aals.md").read_text()


def test_report_header_states_lambda_and_fallback():
    from fare_pipeline.run import report_header

    m = {"lambda_star": 0.5, "selected_layers": [2], "control_lambda": 1.0, "tune_reason": "r", "aals_fallback": False,
         "aals_quantile": 0.75, "aals_threshold": 0.1}
    assert report_header(m) == ["Operating point: ARR at lambda\\* = 0.5 on AALS layers [2]; Tables 3, 6, 7 and 8 "
                                "use it. Tables 4 and 5 use the control lambda = 1 (stated in their titles); Table 2 "
                                "masks experts (no ARR)."]
    zero = report_header({**m, "lambda_star": 0.0, "aals_fallback": True})
    assert zero[0].startswith("**lambda\\* = 0: the operating point is no intervention.**")
    assert "Tables 3, 6, 7 and 8 compare the unmodified model with itself" in zero[0]
    assert zero[1].startswith("**AALS fallback:** no layer's R(l) exceeded the q0.75 threshold (0.1)")
    none = report_header({**m, "lambda_star": None, "tune_reason": "no grid point meets PPL"})
    assert none[0].startswith("**No feasible lambda\\*:** no grid point meets PPL. Table 6 reports the baseline only; "
                              "Tables 3, 7 and 8 use the control lambda = 1 instead")


def test_one_lambda_for_every_operating_point_table():
    from fare_pipeline.stages import intervention_lambda, lambda_label

    assert intervention_lambda(0.0, 1.0) == 0.0  # lambda* = 0 stays 0 (no silent switch to the control lambda)
    assert intervention_lambda(0.5, 1.0) == 0.5 and intervention_lambda(None, 1.0) == 1.0
    assert lambda_label(0.5, 0.5) == "lambda*=0.5"
    assert lambda_label(0.0, 0.0) == "lambda*=0 = no intervention"
    assert lambda_label(1.0, 0.5) == "lambda=1 (not lambda*=0.5)"
    assert lambda_label(1.0, None) == "lambda=1 (no feasible lambda*)"
