"""``fare leaderboard``: rows, deltas, BH, drift, instability over p, plots, FARE tables and bad input.

The study is built from hand-made lm-eval runs (tests/helpers_runs.py: per-item values from the
tasks' own process_results) whose answers change on chosen items, so every Δ and flip rate is
known by hand. Folder names deliberately contradict the identities in the records.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import helpers_runs as hr
import numpy as np
import pytest

from fare_analysis import instability
from fare_analysis.leaderboard import build_leaderboard, main
from fare_core.errors import FareError

N_CROWS, N_BBQ, N_XS = 40, 24, 30
FAST = {"n_permutations": 400, "n_bootstrap": 200, "n_agg_permutations": 50}


def _crows(flips: int):
    """Base prefers sent_more on even items (0.5); the run stops preferring it on the first ``flips`` even items."""
    return [hr.crows_item(i, i % 2 == 0 and i // 2 >= flips, stereo=i % 4 < 2) for i in range(N_CROWS)]


def _bbq(flips: int):
    """Base picks the correct 'Unknown' (2) on ambiguous items; the run picks the target (0) on ``flips`` of them."""
    return [hr.bbq_item(i, 0 if i < flips else 2, context="ambig") for i in range(N_BBQ)]


def _xstest(flips: int):
    """Safe prompts i < 15, unsafe after; base refuses every third; the run refuses the first ``flips`` safe ones."""
    return [hr.xstest_item(i, (i % 3 == 0) or i < flips, label="safe" if i < 15 else "unsafe") for i in range(N_XS)]


def _write(folder: Path, flips, *, model="fare-tiny:olmoe", method=None, p=None, samples=True, tasks=None):
    args = {"pretrained": model}
    fare = {"model_id": model}
    if method:
        args.update({"compression": method, "compression_sparsity": 0.5, "compression_calib_p": p})
        fare["compression"] = method
    built = {"fare_crows_pairs": _crows(flips[0]), "fare_bbq_1k": _bbq(flips[1]), "fare_xstest": _xstest(flips[2])}
    tasks = {t: built[t] for t in (tasks or built)}
    return hr.write_run(folder, tasks, model_args=args, fare_moe=fare, samples=samples)


#: folder -> (flips crows/bbq/xstest, model, method, p); names contradict the records on purpose
STUDY = {
    "hc_smoe_p0.75": ((2, 3, 2), "fare-tiny:olmoe", "magnitude", 0.25),
    "run_b": ((6, 3, 4), "fare-tiny:olmoe", "magnitude", 0.75),
    "magnitude_p0.25": ((4, 6, 1), "fare-tiny:olmoe", "hc_smoe", 0.25),
    "run_d": ((10, 2, 6), "fare-tiny:olmoe", "hc_smoe", 0.75),
    "qwen_run": ((8, 0, 0), "fare-tiny:qwen3_moe", "magnitude", 0.5),
}


def make_study(root: Path) -> dict:
    root = Path(root)
    paths = {"base_olmoe": _write(root / "base_olmoe", (0, 0, 0)),
             "base_qwen": _write(root / "base_qwen", (0, 0, 0), model="fare-tiny:qwen3_moe")}
    for name, (flips, model, method, p) in STUDY.items():
        paths[name] = _write(root / name, flips, model=model, method=method, p=p)
    return paths


def build_study(root: Path, **kw) -> Path:
    paths = make_study(root / "runs")
    runs = [paths[n] for n in ("run_d", "qwen_run", "hc_smoe_p0.75", "magnitude_p0.25", "run_b", "base_olmoe")]
    out = root / "board"
    build_leaderboard(runs, [paths["base_olmoe"], paths["base_qwen"]], out, **{**FAST, **kw})
    return out


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> Path:
    return build_study(tmp_path_factory.mktemp("leaderboard"))


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _f(x: str) -> float:
    return float(x) if x not in ("", None) else math.nan


def test_one_row_per_run_identity_from_records_and_own_baseline(board):
    rows = _rows(board / "leaderboard.csv")
    assert len(rows) == 2 + len(STUDY)  # two baselines (each once, though one was also passed as a run) + 5 runs
    by_path = {Path(r["path"]).name: r for r in rows}
    for name, (_, model, method, p) in STUDY.items():
        r = by_path[name]
        assert (r["model"], r["method"], float(r["p"])) == (model, method, p)  # not what the folder name says
        assert r["role"] == "run" and r["baseline"] == model  # matched with the baseline of its own model
    assert {by_path["base_olmoe"]["role"], by_path["base_qwen"]["role"]} == {"baseline"}
    assert json.loads((board / "leaderboard.json").read_text())["baselines"][1].endswith("base_qwen")


def test_deltas_equal_hand_counts(board):
    by_path = {Path(r["path"]).name: r for r in _rows(board / "leaderboard.csv")}
    for name, ((c, b, x), *_rest) in STUDY.items():
        r = by_path[name]
        # CrowS: c pairs stop preferring sent_more -> stereotype preference drops by c / N
        assert _f(r["fare_crows_pairs/stereotype_preference:delta"]) == pytest.approx(-c / N_CROWS)
        # BBQ accuracy: b ambiguous items answered wrongly
        assert _f(r["fare_bbq_1k/acc:delta"]) == pytest.approx(-b / N_BBQ)
        # XSTest over-refusal is logged on safe prompts only (15); x new refusals among them, minus those
        # the base already refused (every third item)
        new = sum(1 for i in range(x) if i % 3 != 0)
        assert _f(r["fare_xstest/over_refusal:delta"]) == pytest.approx(new / 15)
        assert int(r["fare_xstest/over_refusal:n"]) == 15
        lo, hi = _f(r["fare_crows_pairs/stereotype_preference:ci_low"]), _f(r["fare_crows_pairs/stereotype_preference:ci_high"])
        assert lo <= -c / N_CROWS <= hi


def test_restricted_metrics_compare_only_those_and_keep_their_numbers(board, tmp_path):
    runs = [board.parent / "runs" / n for n in ("run_d", "qwen_run", "hc_smoe_p0.75", "magnitude_p0.25", "run_b")]
    bases = [board.parent / "runs" / "base_olmoe", board.parent / "runs" / "base_qwen"]
    wanted = ["fare_bbq_1k/bias_ambig", "fare_crows_pairs/parity_gap"]
    out = build_leaderboard(runs, bases, tmp_path / "o", metrics=wanted, drift=False, **FAST)
    full = {r["path"]: r for r in _rows(board / "leaderboard.csv")}
    part = _rows(out["leaderboard_csv"])
    assert len(part) == len(full)
    for r in part:
        for m in wanted:
            for k in ("delta", "ci_low", "ci_high", "pvalue", "n"):  # p_BH: a smaller family here
                assert r[f"{m}:{k}"] == full[r["path"]][f"{m}:{k}"], (r["run"], m, k)
    long = _rows(out["comparisons_csv"])
    assert {f"{r['task']}/{r['metric']}" for r in long} == set(wanted) and len(long) == 2 * len(runs)


def test_bh_across_the_whole_table_matches_statsmodels(board):
    from statsmodels.stats.multitest import multipletests

    rows = [r for r in _rows(board / "leaderboard.csv") if r["role"] == "run"]
    metrics = json.loads((board / "leaderboard.json").read_text())["metrics"]
    cells = [(r[f"{m}:pvalue"], r[f"{m}:pvalue_bh"]) for r in rows for m in metrics if r.get(f"{m}:pvalue")]
    raw = np.array([_f(p) for p, _ in cells])
    ok = np.isfinite(raw)
    expected = multipletests(raw[ok], method="fdr_bh")[1]
    got = np.array([_f(q) for _, q in cells])[ok]
    assert len(expected) > 2 * len(rows)  # one family over runs x metrics, not per run
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_drift_columns_are_flip_rates(board):
    by_path = {Path(r["path"]).name: r for r in _rows(board / "leaderboard.csv")}
    for name, ((c, b, x), *_rest) in STUDY.items():
        r = by_path[name]
        assert _f(r["drift:fare_crows_pairs"]) == pytest.approx(c / N_CROWS)  # preferred sentence changed
        assert _f(r["drift:fare_bbq_1k"]) == pytest.approx(b / N_BBQ)  # argmax changed
        new = sum(1 for i in range(x) if i % 3 != 0)
        assert _f(r["drift:fare_xstest"]) == pytest.approx(new / N_XS)  # complied -> refused
        assert _f(r["drift:run"]) == pytest.approx(np.mean([c / N_CROWS, b / N_BBQ, new / N_XS]))
    ranks = {n: int(by_path[n]["rank_drift"]) for n in STUDY}
    assert ranks["run_d"] == max(ranks.values())  # the most flips ranks last


def test_instability_across_p_by_hand(board):
    per_metric = _rows(board / "instability.csv")
    mag = {r["metric"]: r for r in per_metric if r["method"] == "magnitude"}
    hc = {r["metric"]: r for r in per_metric if r["method"] == "hc_smoe"}
    assert {r["model"] for r in per_metric} == {"fare-tiny:olmoe"}  # qwen ran at one p only: no instability
    m = mag["fare_crows_pairs/stereotype_preference"]
    assert _f(m["range"]) == pytest.approx(abs(-6 / 40 - (-2 / 40)))
    assert _f(m["sd"]) == pytest.approx(statistics.pstdev([-2 / 40, -6 / 40]))
    assert _f(m["max_abs"]) == pytest.approx(6 / 40)
    assert _f(hc["fare_crows_pairs/stereotype_preference"]["range"]) == pytest.approx(6 / 40)
    # pooled half-width: RMS of the two runs' CI half-widths, read from the leaderboard itself
    rows = {(r["method"], r["p"]): r for r in _rows(board / "leaderboard.csv") if r["role"] == "run"}
    key = "fare_crows_pairs/stereotype_preference"
    hws = [(_f(rows[("magnitude", p)][f"{key}:ci_high"]) - _f(rows[("magnitude", p)][f"{key}:ci_low"])) / 2
           for p in ("0.25", "0.75")]
    assert _f(m["half_width"]) == pytest.approx(math.sqrt((hws[0] ** 2 + hws[1] ** 2) / 2))
    assert _f(m["range_norm"]) == pytest.approx(_f(m["range"]) / _f(m["half_width"]))
    summary = {r["method"]: r for r in _rows(board / "instability_summary.csv")}
    norms = [_f(r["range_norm"]) for r in mag.values() if math.isfinite(_f(r["range_norm"]))]
    assert _f(summary["magnitude"]["instability"]) == pytest.approx(np.mean(norms))
    assert _f(summary["magnitude"]["mean_range"]) == pytest.approx(np.mean([_f(r["range"]) for r in mag.values()]))


def test_metric_instability_hand_worked():
    pts = [{"p": 0.1, "delta": 0.1, "ci_low": 0.0, "ci_high": 0.2},
           {"p": 0.5, "delta": -0.2, "ci_low": -0.4, "ci_high": 0.0},
           {"p": 0.9, "delta": 0.3, "ci_low": 0.1, "ci_high": 0.5}]
    s = instability.metric_instability(pts)
    assert s["range"] == pytest.approx(0.5)
    assert s["sd"] == pytest.approx(statistics.pstdev([0.1, -0.2, 0.3]))
    assert s["max_abs"] == pytest.approx(0.3)
    assert s["half_width"] == pytest.approx(math.sqrt((0.01 + 0.04 + 0.04) / 3))
    assert s["range_norm"] == pytest.approx(0.5 / math.sqrt(0.03))
    assert math.isnan(instability.metric_instability(pts[:1])["range"])  # one p: no spread


def test_outputs_markdown_plots_and_self_contained_html(board):
    md = (board / "leaderboard.md").read_text()
    table, _, rest = md.partition("## Instability across p")
    assert table.count("\n| fare-tiny:") == 2 + len(STUDY)
    assert rest.count("\n| fare-tiny:olmoe ") == 2  # magnitude and hc_smoe, each run at two p
    for png in ("delta_vs_p.png", "delta_vs_drift.png", "heatmap.png"):
        assert (board / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (board / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert "<script" in page and "<style" in page and 'src="http' not in page and "<link" not in page
    assert page.count("<tr><td") >= 2 + len(STUDY)
    assert 'title="Δ = ' in page  # CIs on hover
    assert len(_rows(board / "comparisons.csv")) > len(STUDY) * 7  # every compared metric, long form


def test_fare_run_folders_give_cross_model_tables(tmp_path):
    from safetensors.numpy import save_file

    def fare_run(folder: Path, model: str, experts: int, top_k: int, config: dict | None, ratio):
        rep = folder / "report"
        rep.mkdir(parents=True)
        (rep / "manifest.json").write_text(json.dumps({"model": model, "model_type": "olmoe", "revision": None,
                                                       "selected_layers": [1], "lambda_star": 0.5, "seed": 0}))
        (rep / "table6_main.csv").write_text("model,lambda_star,layers,crows_base,crows_fare,crows_p\n"
                                             f"{model},0.5,1,0.6,0.55,0.01\n")
        (rep / "table3_architecture.csv").write_text("model,slots,gini,top10_share,rho_phi_f,delta_crows_pp,regime\n"
                                                     f"{model},{experts * 3},0.4,0.1,0.2,-1.0,\n")
        (rep / "table5_cross_architecture.csv").write_text(
            "model,experts_per_layer,fsp,top_5,top_50,top_100,random,inverted\n"
            f"{model},{experts},-1.0,0.0,-0.5,-0.5,0.1,0.2\n")
        (rep / "aals.csv").write_text("layer,delta_bias,delta_ppl,R,selected\n" + "".join(
            f"{i},0.0,0.0,{r},{i == 1}\n" for i, r in enumerate(ratio)))
        mdir = folder / "model"
        mdir.mkdir()
        if config is not None:
            (mdir / "config.json").write_text(json.dumps(config))
            save_file({"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}, str(mdir / "m.safetensors"))
        (folder / "profile" / "routing").mkdir(parents=True)
        (folder / "profile" / "routing" / "routing.json").write_text(json.dumps(
            {"model": str(mdir), "num_experts": experts, "top_k": [top_k] * 3, "layers": [0, 1, 2]}))
        return folder

    a = fare_run(tmp_path / "x", "org/moe-a", 8, 2, {"n_shared_experts": 2}, [0.1, 0.5, 0.2])
    b = fare_run(tmp_path / "y", "org/moe-b", 64, 8, None, [0.3, 0.1, 0.0])
    out = tmp_path / "board"
    paths = build_leaderboard([a, b], [], out)
    t1 = {r["model"]: r for r in _rows(out / "fare" / "table1_models.csv")}
    assert t1["org/moe-a"] == {"model": "org/moe-a", "model_type": "olmoe", "experts": "8", "top_k": "2",
                               "shared": "2", "moe_layers": "3", "params": "17"}  # 3*4 + 5 from the headers
    assert t1["org/moe-b"]["shared"] == "" and t1["org/moe-b"]["experts"] == "64"  # no config on disk
    for stem in ("table3_architecture", "table5_cross_architecture", "table6_main"):
        assert [r["model"] for r in _rows(out / "fare" / f"{stem}.csv")] == ["org/moe-a", "org/moe-b"]
    assert paths["fare/fig3_aals_ratio"].read_bytes()[:4] == b"\x89PNG"
    page = (out / "index.html").read_text()
    assert "table1_models" in page and page.count("data:image/png") == 1


# ------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("bad"))


def test_run_without_a_baseline_for_its_model(study, tmp_path):
    with pytest.raises(FareError, match=r"qwen_run: no --baseline for model fare-tiny:qwen3_moe .*add --baseline"):
        build_leaderboard([study["qwen_run"]], [study["base_olmoe"]], tmp_path / "o", **FAST)
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_different_tasks_empty_folder_no_samples_and_two_baselines(study, tmp_path):
    xs = _write(tmp_path / "xs_only", (1, 1, 1), method="magnitude", p=0.5, tasks=["fare_xstest"])
    crows_base = _write(tmp_path / "crows_base", (0, 0, 0), tasks=["fare_crows_pairs"])
    with pytest.raises(FareError, match=r"xs_only: no task in common with its baseline .*crows_base"):
        build_leaderboard([xs], [crows_base], tmp_path / "o", **FAST)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FareError, match=r"empty: empty folder"):
        build_leaderboard([tmp_path / "empty"], [study["base_olmoe"]], tmp_path / "o", **FAST)
    nos = _write(tmp_path / "nosamples", (1, 1, 1), method="magnitude", p=0.5, samples=False)
    with pytest.raises(FareError, match=r"nosamples.*--log_samples"):
        build_leaderboard([nos], [study["base_olmoe"]], tmp_path / "o", **FAST)
    other = _write(tmp_path / "other_base", (0, 0, 0))
    with pytest.raises(FareError, match=r"other_base: second --baseline for model fare-tiny:olmoe"):
        build_leaderboard([study["run_b"]], [study["base_olmoe"], other], tmp_path / "o", **FAST)
    with pytest.raises(FareError, match=r"--metrics 'fare_bbq_1k/nope'"):
        build_leaderboard([study["run_b"]], [study["base_olmoe"]], tmp_path / "o", metrics=["fare_bbq_1k/nope"])
    with pytest.raises(FareError, match=r"^n_agg_permutations=0; allowed: a positive integer$"):
        build_leaderboard([study["run_b"]], [study["base_olmoe"]], tmp_path / "o", **{**FAST, "n_agg_permutations": 0})
    with pytest.raises(FareError, match=r"^--permutations=0; allowed: a positive integer$"):
        main([str(study["run_b"]), "--baseline", str(study["base_olmoe"]), "--out", str(tmp_path / "o"),
              "--permutations", "0"])
    assert not (tmp_path / "o").exists()


def test_existing_output_is_kept_unless_overwrite(study, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FareError, match=r"exists and is not empty; pass --overwrite"):
        build_leaderboard([study["run_b"]], [study["base_olmoe"]], out, drift=False, **FAST)
    with pytest.raises(FareError, match=r"not a leaderboard folder"):
        build_leaderboard([study["run_b"]], [study["base_olmoe"]], out, drift=False, overwrite=True, **FAST)
    assert (out / "keep.txt").read_text() == "mine"
    board = tmp_path / "board"
    assert main([str(study["run_b"]), "--baseline", str(study["base_olmoe"]), "--out", str(board), "--no-drift",
                 "--permutations", "100", "--bootstrap", "100", "--agg-permutations", "20"]) == 0
    first = _rows(board / "leaderboard.csv")
    build_leaderboard([study["run_b"], study["run_d"]], [study["base_olmoe"]], board, drift=False, overwrite=True,
                      **FAST)
    assert len(_rows(board / "leaderboard.csv")) == len(first) + 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_cli_error_is_one_line(study, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fare_models.cli", "leaderboard", str(study["qwen_run"]),
                           "--baseline", str(study["base_olmoe"]), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(study["qwen_run"]) in lines[0] and "--baseline" in lines[0]


def test_interrupted_build_resumes_and_extension_reuses_results(study, tmp_path, monkeypatch):
    import fare_analysis.leaderboard as lb

    real, calls = lb._compare, []

    def flaky(base, run, **kw):
        calls.append(run.path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while comparing the third run
        return real(base, run, **kw)

    monkeypatch.setattr(lb, "_compare", flaky)
    runs = [study[n] for n in ("hc_smoe_p0.75", "run_b", "magnitude_p0.25", "run_d")]
    out = tmp_path / "board"
    with pytest.raises(KeyboardInterrupt):
        build_leaderboard(runs, [study["base_olmoe"]], out, **FAST)
    assert not out.exists()
    calls.clear()
    build_leaderboard(runs, [study["base_olmoe"]], out, **FAST)
    assert calls == [study["magnitude_p0.25"], study["run_d"]]  # the first two came from the cache
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(lb, "_compare", real)
    build_leaderboard(runs, [study["base_olmoe"]], fresh, **FAST)
    assert (out / "leaderboard.csv").read_text() == (fresh / "leaderboard.csv").read_text()
    monkeypatch.setattr(lb, "_compare", flaky)
    calls.clear()
    build_leaderboard(runs + [study["qwen_run"]], [study["base_olmoe"], study["base_qwen"]], out, overwrite=True, **FAST)
    assert calls == [study["qwen_run"]]
    assert len(list((out / "cache").iterdir())) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_non_dense_baseline_is_flagged(study, tmp_path):
    build_leaderboard([study["run_d"]], [study["run_b"]], tmp_path / "o", drift=False, **FAST)
    assert "is not the dense model (method magnitude" in (tmp_path / "o" / "leaderboard.md").read_text()
