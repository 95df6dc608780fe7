"""fare_analysis.stats against scipy / statsmodels / hand-worked values."""

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from fare_analysis.stats import (
    aggregate_comparison,
    bh_adjust,
    bh_family,
    bootstrap_ci,
    label_swap_test,
    paired_comparison,
    paired_permutation_test,
)


def _mean_diff(x, y, axis=-1):
    return np.mean(x - y, axis=axis)


# ----------------------------------------------------------------- permutation test


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_permutation_exact_matches_scipy(alternative):
    rng = np.random.default_rng(1)
    x = rng.normal(0.3, 1.0, 11)
    y = rng.normal(0.0, 1.0, 11)
    ours = paired_permutation_test(x, y, alternative=alternative)  # 2**11 <= 10,000 -> exhaustive
    ref = sps.permutation_test((x, y), _mean_diff, permutation_type="samples", alternative=alternative,
                               vectorized=True, n_resamples=10_000)
    assert ours.exact and ours.n_resamples == 2**11
    assert ours.pvalue == pytest.approx(ref.pvalue, abs=1e-12)
    assert ours.statistic == pytest.approx(ref.statistic, rel=1e-12)


def test_permutation_exact_with_ties_binary_items():
    # CrowS-style 0/1 outcomes: many exact ties in the null distribution.
    x = np.array([1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0], float)
    y = np.array([0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0], float)
    ours = paired_permutation_test(x, y)
    ref = sps.permutation_test((x, y), _mean_diff, permutation_type="samples", vectorized=True, n_resamples=10_000)
    assert ours.pvalue == pytest.approx(ref.pvalue, abs=1e-12)
    # hand check: 6 non-zero differences, all +1 -> exact two-sided p = 2 * (1/64) = 1/32
    assert ours.pvalue == pytest.approx(1 / 32, abs=1e-12)


def test_permutation_monte_carlo_close_to_scipy_and_seeded():
    rng = np.random.default_rng(2)
    x = rng.normal(0.25, 1.0, 60)
    y = rng.normal(0.0, 1.0, 60)
    ours = paired_permutation_test(x, y, seed=7)
    ref = sps.permutation_test((x, y), _mean_diff, permutation_type="samples", vectorized=True,
                               n_resamples=100_000, rng=123)
    assert not ours.exact and ours.n_resamples == 10_000 and ours.seed == 7
    # Monte-Carlo SE of p is <= sqrt(p(1-p)/1e4) ~ 0.005; allow ~5 SE.
    assert abs(ours.pvalue - ref.pvalue) < 0.025
    assert 0.0 < ours.pvalue < 0.5
    again = paired_permutation_test(x, y, seed=7)
    assert again == ours
    assert paired_permutation_test(x, y, seed=8).pvalue != ours.pvalue


def test_permutation_custom_statistic_matches_scipy():
    rng = np.random.default_rng(3)
    d = rng.standard_t(3, 10) + 0.5
    med = lambda a, axis=-1: np.median(a, axis=axis)
    ours = paired_permutation_test(d, statistic=med)
    ref = sps.permutation_test((d,), med, permutation_type="samples", vectorized=True, n_resamples=10_000)
    assert ours.pvalue == pytest.approx(ref.pvalue, abs=1e-12)


def test_permutation_bad_input():
    with pytest.raises(ValueError, match="pair item for item"):
        paired_permutation_test([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="alternative='sideways'"):
        paired_permutation_test([1, 2], [0, 1], alternative="sideways")
    with pytest.raises(ValueError, match="empty"):
        paired_permutation_test([], [])
    with pytest.raises(ValueError, match="NaN"):
        paired_permutation_test([1.0, np.nan])


# ----------------------------------------------------------------- bootstrap


@pytest.mark.parametrize("method,scipy_method", [("percentile", "percentile"), ("basic", "basic"), ("bca", "BCa")])
def test_bootstrap_one_sample_matches_scipy(method, scipy_method):
    rng = np.random.default_rng(4)
    x = rng.exponential(2.0, 40)  # skewed: percentile, basic and BCa differ visibly
    ours = bootstrap_ci(x, method=method, seed=11)
    ref = sps.bootstrap((x,), np.mean, n_resamples=1000, method=scipy_method, rng=11)
    assert (ours.n_resamples, ours.seed, ours.n) == (1000, 11, 40)
    assert ours.low == pytest.approx(ref.confidence_interval.low, rel=1e-10)
    assert ours.high == pytest.approx(ref.confidence_interval.high, rel=1e-10)
    assert ours.standard_error == pytest.approx(ref.standard_error, rel=1e-10)
    assert ours.estimate == pytest.approx(x.mean())


def test_bootstrap_methods_really_differ():
    x = np.random.default_rng(4).exponential(2.0, 40)
    lows = {m: bootstrap_ci(x, method=m, seed=11).low for m in ("percentile", "basic", "bca")}
    assert len({round(v, 6) for v in lows.values()}) == 3


@pytest.mark.parametrize("method,scipy_method", [("percentile", "percentile"), ("bca", "BCa")])
def test_bootstrap_paired_non_mean_statistic_matches_scipy(method, scipy_method):
    # Non-mean statistic of paired data: ratio of means (e.g. PPL ratio), items resampled as pairs.
    rng = np.random.default_rng(5)
    a = rng.gamma(3.0, 1.0, 30)
    b = a * rng.uniform(0.8, 1.4, 30)

    def ratio(x, y, axis=-1):
        return np.mean(y, axis=axis) / np.mean(x, axis=axis)

    ours = bootstrap_ci(a, b, statistic=ratio, method=method, seed=3, confidence_level=0.9)
    ref = sps.bootstrap((a, b), ratio, paired=True, n_resamples=1000, method=scipy_method,
                        confidence_level=0.9, rng=3)
    assert ours.low == pytest.approx(ref.confidence_interval.low, rel=1e-10)
    assert ours.high == pytest.approx(ref.confidence_interval.high, rel=1e-10)


def test_bootstrap_median_matches_scipy():
    x = np.random.default_rng(6).normal(size=25)
    med = lambda a, axis=-1: np.median(a, axis=axis)
    ours = bootstrap_ci(x, statistic=med, seed=0)
    ref = sps.bootstrap((x,), med, n_resamples=1000, method="percentile", rng=0)
    assert (ours.low, ours.high) == pytest.approx(tuple(ref.confidence_interval), rel=1e-10)


def test_bootstrap_bad_input():
    with pytest.raises(ValueError, match="method='normal'"):
        bootstrap_ci([1.0, 2.0, 3.0], method="normal")
    with pytest.raises(ValueError, match="equal length"):
        bootstrap_ci([1.0, 2.0], [1.0], statistic=lambda a, b, axis=-1: a.mean(axis) - b.mean(axis))
    with pytest.raises(ValueError, match="confidence_level=1.5"):
        bootstrap_ci([1.0, 2.0], confidence_level=1.5)


# ----------------------------------------------------------------- Benjamini-Hochberg


def test_bh_equals_statsmodels_exactly():
    rng = np.random.default_rng(7)
    for m in (1, 2, 5, 17, 200):
        p = rng.uniform(size=m) ** 3
        p[: m // 3] = p[0]  # ties
        ref = multipletests(p, method="fdr_bh")[1]
        np.testing.assert_array_equal(bh_adjust(p), ref)


def test_bh_hand_worked():
    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.04, 0.04, 0.5
    np.testing.assert_allclose(bh_adjust([0.5, 0.03, 0.01, 0.02]), [0.5, 0.04, 0.04, 0.04])
    with pytest.raises(ValueError, match=r"p-value 1\.2 out of range; allowed: finite values in \[0, 1\]"):
        bh_adjust([0.1, 1.2])


def test_paired_comparison_and_family():
    rng = np.random.default_rng(9)
    base = rng.integers(0, 2, 200).astype(float)
    flip = rng.uniform(size=200) < 0.15
    treated = np.where(flip, 0.0, base)  # intervention removes some stereotyped choices
    r = paired_comparison(base, treated, name="crows", seed=5)
    assert r["delta"] == pytest.approx(treated.mean() - base.mean())
    assert r["ci_low"] < r["delta"] < r["ci_high"] < 0
    ref = bootstrap_ci(treated - base, seed=5)
    assert (r["ci_low"], r["ci_high"]) == (ref.low, ref.high)
    assert r["pvalue"] == paired_permutation_test(treated, base, seed=5).pvalue
    assert (r["n_permutations"], r["n_bootstrap"], r["seed"]) == (10_000, 1_000, 5)
    fam = bh_family([r, {**r, "name": "tqa", "pvalue": 0.04}, {**r, "name": "ss", "pvalue": 0.5}])
    np.testing.assert_array_equal([x["pvalue_bh"] for x in fam],
                                  multipletests([r["pvalue"], 0.04, 0.5], method="fdr_bh")[1])


def test_permutation_monte_carlo_p_never_zero():
    # 30 positive differences: no random sign pattern (all-plus has prob 2**-30) reaches the
    # observed mean, so p = 2 * (0 + 1) / (10,000 + 1) with the Monte-Carlo +1 correction.
    r = paired_permutation_test(np.arange(1.0, 31.0))
    assert not r.exact and r.pvalue == 2 / 10_001
    assert paired_permutation_test(np.arange(1.0, 31.0), alternative="greater", n_resamples=999).pvalue == 1 / 1000


# ----------------------------------------------------------------- aggregates (label swap)


def _ratio_gap(items):
    """A non-mean aggregate: |share of ones - 0.5| (CrowS parity gap)."""
    return abs(sum(items) / len(items) - 0.5)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_label_swap_exact_matches_scipy_samples_permutation(alternative):
    rng = np.random.default_rng(4)
    a = rng.integers(0, 2, 12).astype(float)
    b = rng.integers(0, 2, 12).astype(float)

    def stat(swap):
        return _ratio_gap(np.where(swap, a, b)) - _ratio_gap(np.where(swap, b, a))

    ours = label_swap_test(stat, 12, alternative=alternative)
    ref = sps.permutation_test((a, b), lambda x, y: _ratio_gap(y) - _ratio_gap(x), permutation_type="samples",
                               vectorized=False, n_resamples=10_000, alternative=alternative)
    assert ours.exact and ours.n_resamples == 2**12
    assert ours.pvalue == pytest.approx(ref.pvalue, abs=1e-12)


def test_label_swap_over_untied_items_is_the_exact_test_over_all_items():
    rng = np.random.default_rng(8)
    a = rng.integers(0, 2, 14).astype(float)
    b = a.copy()
    b[[1, 4, 6, 9, 12]] = 1 - b[[1, 4, 6, 9, 12]]  # 5 items differ, 9 are tied

    def stat(swap):
        return _ratio_gap(np.where(swap, a, b)) - _ratio_gap(np.where(swap, b, a))

    ours = label_swap_test(stat, 14, tied=a == b, n_resamples=100)  # 2**5 patterns: exact
    ref = sps.permutation_test((a, b), lambda x, y: _ratio_gap(y) - _ratio_gap(x), permutation_type="samples",
                               vectorized=False, n_resamples=2**14)
    assert ours.exact and ours.n_resamples == 2**5
    assert ours.pvalue == pytest.approx(ref.pvalue, abs=1e-12)
    same = label_swap_test(lambda swap: 0.0, 6, tied=np.ones(6, dtype=bool))
    assert same.pvalue == 1.0 and same.n_resamples == 1


def test_label_swap_is_the_sign_flip_test_for_a_mean():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 1, 40), rng.normal(0.4, 1, 40)
    swapped = label_swap_test(lambda s: float(np.mean(np.where(s, a, b) - np.where(s, b, a))), 40,
                              n_resamples=3000, seed=9)
    flipped = paired_permutation_test(b, a, n_resamples=3000, seed=9)
    assert swapped.pvalue == pytest.approx(flipped.pvalue, abs=1e-12)  # same patterns, same p-value


def test_aggregate_comparison_ci_matches_scipy_bootstrap_and_drops_undefined_resamples():
    a = [1.0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1]
    b = [0.0, 1, 0, 0, 1, 0, 0, 1, 0, 1, 0, 0]
    res = aggregate_comparison(a, b, _ratio_gap, n_bootstrap=500, n_permutations=4096, seed=2)
    assert res["delta"] == pytest.approx(_ratio_gap(b) - _ratio_gap(a))
    ref = sps.bootstrap((np.arange(12),), lambda i: _ratio_gap([b[k] for k in i]) - _ratio_gap([a[k] for k in i]),
                        paired=True, vectorized=False, n_resamples=500, method="percentile",
                        rng=np.random.default_rng(2))
    assert (res["ci_low"], res["ci_high"]) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))

    def first_only(items):  # undefined (NaN) when the resample has no item equal to 2
        kept = [x for x in items if x == 2]
        return float("nan") if not kept else len(kept) / len(items)

    out = bootstrap_ci(np.array([2.0, 0, 0, 0, 0]), statistic=lambda x, axis=-1: np.apply_along_axis(
        first_only, -1, x), n_resamples=400, seed=0, nan_policy="omit")
    assert 0 < out.n_resamples < 400 and out.low > 0  # resamples without a 2 dropped, counted
    with pytest.raises(ValueError, match="undefined"):
        aggregate_comparison([0.0, 0.0], [0.0, 1.0], first_only)
