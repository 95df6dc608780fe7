"""`fare robustness` (paper section 5.5) on fare-tiny: every table's numbers against an independent
computation - CrowS splits and length matching recomputed from the seeded rule and token counts,
log-likelihoods from plain forwards under fare_models.surgery edits (not the pipeline engine),
the ARD-only profile from the routing aggregates by hand, the matched-perplexity mask picked by
rule here, p-values from scipy.stats.permutation_test."""

import csv
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from fare_models.cli import main
from fare_pipeline.robustness import (
    jaccard,
    mask_grid,
    matched_n,
    middle_layers,
    operating_lambda,
)

LAM = 20.0  # fare-tiny's CrowS preferences barely react to routing; a strong lambda flips a few pairs
SEED, N_TEST, N_PPL = 0, 64, 8
PERMUTATIONS = 2**18  # the length-matched subset (18 pairs) is then enumerated exactly
ARGS = ["--quick", "--contexts-per-descriptor", "2", "--crows-val", "16", "--crows-test", str(N_TEST), "--ppl-val",
        str(N_PPL), "--ppl-test", str(N_PPL), "--tqa", "3", "--permutations", str(PERMUTATIONS), "--bootstrap", "100",
        "--lam", str(LAM), "--no-progress", "--progress-interval", "0"]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _layers(cell: str) -> list[int]:
    return [int(x) for x in cell.split("|")]


@pytest.fixture(scope="module")
def rob(tmp_path_factory):
    out = tmp_path_factory.mktemp("rob") / "out"
    assert main(["robustness", "--model", "fare-tiny", "--out", str(out), *ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def lm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fare_core.tiny import tiny_model_path

    path = tiny_model_path("fare-tiny")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.inference_mode()
def _ll(lm, texts, edit=None):
    """Summed log-probability of each text after the BOS prefix token (one plain forward per text)."""
    model, tok = lm
    out = []
    with edit() if edit else _null():
        for t in texts:
            ids = torch.tensor([[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]]])
            lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            out.append((float(lp.gather(1, ids[0, 1:, None]).sum()), ids.shape[1] - 1))
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _arr(lm, phi, layers, profile_layers):
    from fare_models.surgery import ARR

    return lambda: ARR(lm[0], phi, LAM, layers=list(layers), profile_layers=list(profile_layers))


def _mask(lm, pairs):
    from fare_models.surgery import ExpertMask

    return lambda: ExpertMask(lm[0], pairs)


def _phi(path):
    from fare_models.profile import load_profile

    p = load_profile(path)
    return p.phi.float(), list(p.layers)


def _test_pairs(n):
    from fare_tasks.crows import load_pairs

    pairs = load_pairs()
    ranked = sorted(pairs, key=lambda p: hashlib.sha256(f"{SEED}|crows|{p['pair_id']}".encode()).hexdigest())
    return ranked[round(len(ranked) * 0.5):][:n]


def _prefs(lm, pairs, edit=None):
    more = _ll(lm, [p["sent_more"] for p in pairs], edit)
    less = _ll(lm, [p["sent_less"] for p in pairs], edit)
    return np.array([float(a[0] > b[0]) for a, b in zip(more, less)])


def _ppl_texts(rob, split):
    from fare_pipeline.prompts import PromptSet

    ps = PromptSet.read(rob / "seed_0" / "prompts")
    ranked = sorted(((q.id, q.text) for q in ps.prompts if q.split == split),
                    key=lambda it: hashlib.sha256(f"{SEED}|ppl|{it[0]}".encode()).hexdigest())
    return [x for _, x in ranked[:N_PPL]]


def _ppl(lm, texts, edit=None):
    ll = _ll(lm, texts, edit)
    return float(np.exp(-sum(a for a, _ in ll) / sum(n for _, n in ll)))


def _exact_p(a, b):
    d = np.asarray(b) - np.asarray(a)
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    res = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf,
                                 alternative="two-sided")
    return float(res.pvalue)


def test_rules_by_hand():
    assert middle_layers([0, 1, 2, 3], 1) == [2] and middle_layers(range(16), 3) == [7, 8, 9]
    assert middle_layers(range(15), 3) == [6, 7, 8] and middle_layers([4, 5, 6], 3) == [4, 5, 6]
    assert matched_n({1: 10.0, 2: 12.0, 3: 8.0}, 10.0) == 1 and matched_n({1: 9.0, 2: 11.0}, 10.0) == 1
    assert jaccard([1, 2], [2, 3]) == pytest.approx(1 / 3)
    assert operating_lambda(0.5, 1.0) == (0.5, "lambda*=0.5")
    assert operating_lambda(0.0, 1.0) == (1.0, "lambda=1 (not lambda*=0)")  # lambda* = 0 would test nothing
    assert operating_lambda(None, 2.0) == (2.0, "lambda=2 (no feasible lambda*)")


def test_mask_grid_top_n_over_layers_by_hand():
    """Profile rows = decoder layers 3 and 5; global ranking by phi; a set that leaves a layer
    fewer than top_k experts (room 2 per layer here) ends the grid."""
    phi = torch.tensor([[0.9, 0.1, 0.8, 0.7], [0.95, 0.5, 0.2, 0.3]])
    grid = dict(mask_grid(phi, [3, 5], [3, 5], {3: 2, 5: 2}))
    # ranking 0.95 (5,0) > 0.9 (3,0) > 0.8 (3,2) > 0.7 (3,3): n = 4 would mask a third expert of layer 3
    assert grid == {1: [(5, 0)], 2: [(3, 0), (5, 0)], 3: [(3, 0), (3, 2), (5, 0)]}
    assert dict(mask_grid(phi, [3, 5], [5], {3: 2, 5: 1})) == {1: [(5, 0)]}
    # the architecture's own rule (ExpertMask refusing a set) drops a size too
    assert sorted(dict(mask_grid(phi, [3, 5], [3, 5], {3: 2, 5: 2}, lambda pairs: (3, 2) not in pairs))) == [1, 2]


@pytest.mark.slow
def test_length_matched_subset_and_its_own_pvalue(rob, lm):
    """(d): the subset from token counts, both preferences from plain forwards, exact p from scipy."""
    info = json.loads((rob / "checks" / "checks.json").read_text())
    sel = info["selected"]
    phi, pl = _phi(rob / "seed_0" / "profile" / "phi.safetensors")
    pairs = _test_pairs(N_TEST)
    tok = lm[1]
    matched = np.array([len(tok(p["sent_more"], add_special_tokens=False)["input_ids"])
                        == len(tok(p["sent_less"], add_special_tokens=False)["input_ids"]) for p in pairs])
    base, fare = _prefs(lm, pairs), _prefs(lm, pairs, _arr(lm, phi, sel, pl))
    assert (fare != base)[matched].any(), "lambda too weak to test anything"
    rows = {r["subset"]: r for r in _rows(rob / "report" / "robustness_d_length_matched.csv")}
    tests = {r["comparison"]: r for r in _rows(rob / "report" / "robustness_d_tests.csv")}
    for subset, idx in (("all pairs", np.ones(len(pairs), bool)), ("length-matched", matched)):
        r = rows[subset]
        assert int(r["n"]) == idx.sum()
        assert float(r["crows_base"]) == pytest.approx(base[idx].mean())
        assert float(r["crows_fare"]) == pytest.approx(fare[idx].mean())
        t = tests[f"FARE vs base: crows, {subset}"]
        assert float(t["delta"]) == pytest.approx(fare[idx].mean() - base[idx].mean())
    assert 0 < 2 ** matched.sum() <= PERMUTATIONS  # the pipeline enumerates every sign pattern
    assert float(tests["FARE vs base: crows, length-matched"]["pvalue"]) == pytest.approx(
        _exact_p(base[matched], fare[matched]))
    # BH over the two tests of (d), by hand
    p = sorted(float(t["pvalue"]) for t in tests.values())
    bh = [min(1.0, min(p[j] * 2 / (j + 1) for j in range(i, 2))) for i in range(2)]
    assert sorted(float(t["pvalue_bh"]) for t in tests.values()) == pytest.approx(bh)


@pytest.mark.slow
def test_ard_only_profile_from_the_aggregates(rob, lm):
    """(a): ARD-only phi = min-max per layer of mean_g |P(e|g) - P(e|neutral)|, and its ARR row."""
    from fare_models.surgery import load_routing

    agg, meta = load_routing(rob / "seed_0" / "profile" / "routing")
    c, t = agg["counts"].double().numpy(), agg["tokens"].double().numpy()
    groups = meta["groups"]
    ni = groups.index("neutral")
    demo = [g for g in range(len(groups)) if g != ni and t[0, g] > 0]
    p = c / t[:, None, :]
    ard = np.mean([np.abs(p[:, :, g] - p[:, :, ni]) for g in demo], axis=0)
    lo, hi = ard.min(axis=1, keepdims=True), ard.max(axis=1, keepdims=True)
    want = (ard - lo) / (hi - lo)
    phi_ard, pl = _phi(rob / "ard_profile" / "phi.safetensors")
    np.testing.assert_allclose(phi_ard.numpy(), want, atol=1e-6)
    phi, _ = _phi(rob / "seed_0" / "profile" / "phi.safetensors")
    assert not np.allclose(phi.numpy(), want)  # the composite is a different profile
    sel = json.loads((rob / "checks" / "checks.json").read_text())["selected"]
    pairs = _test_pairs(N_TEST)
    rows = {r["profile"]: r for r in _rows(rob / "report" / "robustness_a_profile.csv")}
    assert float(rows["ard"]["crows"]) == pytest.approx(_prefs(lm, pairs, _arr(lm, phi_ard, sel, pl)).mean())
    assert float(rows["composite"]["crows"]) == pytest.approx(_prefs(lm, pairs, _arr(lm, phi, sel, pl)).mean())
    assert float(rows["-"]["crows"]) == pytest.approx(_prefs(lm, pairs).mean())
    texts = _ppl_texts(rob, "test")
    for name, edit in (("-", None), ("composite", _arr(lm, phi, sel, pl)), ("ard", _arr(lm, phi_ard, sel, pl))):
        assert float(rows[name]["ppl"]) == pytest.approx(_ppl(lm, texts, edit), rel=1e-5), name


@pytest.mark.slow
def test_matched_perplexity_mask_picked_by_rule(rob, lm):
    """(c): top-n phi experts ranked here, validation perplexity from plain forwards, n* by the rule."""
    info = json.loads((rob / "checks" / "checks.json").read_text())
    sel = info["selected"]
    phi, pl = _phi(rob / "seed_0" / "profile" / "phi.safetensors")
    texts = _ppl_texts(rob, "validation")
    ppl = lambda edit=None: _ppl(lm, texts, edit)

    # descending phi; ties -> lower layer, then lower expert
    cells = sorted((-float(phi[pl.index(layer), e]), layer, e) for layer in sel for e in range(phi.shape[1]))
    room = 8 - 2  # fare-tiny: 8 experts, top-2, every layer keeps two
    grid = {}
    for n in range(1, room * len(sel) + 1):
        pairs = sorted((layer, e) for _, layer, e in cells[:n])
        if all(sum(1 for lay, _ in pairs if lay == layer) <= room for layer in sel):
            grid[n] = ppl(_mask(lm, pairs))
    ppl_arr = ppl(_arr(lm, phi, sel, pl))
    n_star = min(grid, key=lambda n: (abs(grid[n] - ppl_arr), n))
    assert info["n_star"] == n_star and info["mask_grid"] == sorted(grid)
    table = {int(r["n_masked"]): r for r in _rows(rob / "report" / "masking_grid.csv")}
    for n, v in grid.items():
        assert float(table[n]["ppl_validation"]) == pytest.approx(v, rel=1e-5)
    rows = {r["method"]: r for r in _rows(rob / "report" / "robustness_c_soft_vs_hard.csv")}
    assert int(rows["mask"]["n_masked"]) == n_star
    assert float(rows["arr"]["ppl_validation"]) == pytest.approx(ppl_arr, rel=1e-5)
    pairs = _test_pairs(N_TEST)
    masked = sorted((layer, e) for _, layer, e in cells[:n_star])
    assert [tuple(x) for x in info["masked"]] == masked
    assert float(rows["mask"]["crows"]) == pytest.approx(_prefs(lm, pairs, _mask(lm, masked)).mean())
    assert float(rows["mask"]["ppl"]) == pytest.approx(_ppl(lm, _ppl_texts(rob, "test"), _mask(lm, masked)), rel=1e-5)


@pytest.mark.slow
def test_middle_layers_and_seed_stability(rob, lm):
    """(b): the middle window by hand, its CrowS row from plain forwards, core layers and Jaccard of
    the three seeds' own aals.json, and the seeds really use different CrowS validation splits."""
    info = json.loads((rob / "checks" / "checks.json").read_text())
    sel = info["selected"]
    k = len(sel)
    assert info["middle"] == list(range(4))[(4 - k + 1) // 2:][:k]
    rows = {r["condition"]: r for r in _rows(rob / "report" / "robustness_b_layers.csv")}
    assert _layers(rows["Fixed middle layers"]["layers"]) == info["middle"]
    phi, pl = _phi(rob / "seed_0" / "profile" / "phi.safetensors")
    pairs = _test_pairs(N_TEST)
    assert float(rows["Fixed middle layers"]["crows"]) == pytest.approx(
        _prefs(lm, pairs, _arr(lm, phi, info["middle"], pl)).mean())
    assert float(rows["Fixed middle layers"]["ppl"]) == pytest.approx(
        _ppl(lm, _ppl_texts(rob, "test"), _arr(lm, phi, info["middle"], pl)), rel=1e-5)
    aals = {s: json.loads((rob / f"seed_{s}" / "layers" / "aals.json").read_text()) for s in (0, 1, 2)}
    sels = {s: a["selected"] for s, a in aals.items()}
    splits = {s: json.loads((rob / f"seed_{s}" / "layers" / "validation_split.json").read_text())["crows_pair_ids"]
              for s in (0, 1, 2)}
    assert len({tuple(v) for v in splits.values()}) == 3
    core = sorted(set(sels[0]) & set(sels[1]) & set(sels[2]))
    mj = np.mean([len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in itertools.combinations(sels.values(), 2)])
    assert info["seed_stability"]["core"] == core
    assert info["seed_stability"]["mean_jaccard"] == pytest.approx(mj)
    seeds = _rows(rob / "report" / "robustness_b_seeds.csv")
    assert {int(r["seed"]): _layers(r["selected"]) for r in seeds} == sels
    assert {int(r["seed"]): r["fallback"] == "True" for r in seeds} == {s: a["fallback"] for s, a in aals.items()}


@pytest.mark.slow
def test_report_resume_and_bad_inputs(rob, tmp_path, capsys):
    md = (rob / "report" / "robustness.md").read_text()
    assert f"lambda={LAM:g} (--lam)" in md and all(f"## ({x})" in md for x in "abcd")
    files = lambda: {p: p.read_bytes() for p in rob.rglob("*") if p.is_file() and p.name != "timings.json"}
    before = files()
    assert main(["robustness", "--model", "fare-tiny", "--out", str(rob), *ARGS]) == 0  # every stage skipped
    assert "[checks] up to date" in capsys.readouterr().err
    assert files() == before
    assert main(["robustness", "--model", "fare-tiny", "--out", str(rob), *ARGS, "--no-resume"]) == 0
    assert "[checks] up to date" not in capsys.readouterr().err
    assert files() == before  # recomputed byte for byte (only timings.json differs)
    (tmp_path / "mine.txt").write_text("x")
    assert main(["robustness", "--model", "fare-tiny", "--out", str(tmp_path), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mine.txt" in err[0]
    for bad, shown in ((["--seeds", "0"], "--seeds 0"), (["--lam", "nan"], "--lam nan"),
                       (["--middle-layers", "9"], "middle-layer count 9; allowed: 1..4")):
        assert main(["robustness", "--model", "fare-tiny", "--out", str(tmp_path / "n"), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert shown in err[-1] and "Traceback" not in "".join(err)
        assert not (tmp_path / "n").exists()


def test_temp_folders_of_a_killed_run_are_not_foreign(tmp_path, capsys):
    out = tmp_path / "killed"
    (out / ".checks.tmp-999999").mkdir(parents=True)  # what stage() leaves behind after a kill -9
    (out / ".seed_0.tmp-x").mkdir()  # not a temp name of the atomic writers (no pid)
    assert main(["robustness", "--model", "fare-tiny", "--out", str(out), "--middle-layers", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'.seed_0.tmp-x'" in err[0] and "not part of a fare robustness folder" in err[0]
    (out / ".seed_0.tmp-x").rmdir()
    assert main(["robustness", "--model", "fare-tiny", "--out", str(out), "--middle-layers", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "middle-layer count 9" in err[-1]  # got past the folder check: the temp folder is the command's own
