"""Statistics shared by every fare-moe comparison (SPEC section 9; paper section 4.2).

* :func:`paired_permutation_test` - sign-flip permutation test on per-item differences
  (10,000 permutations by default, two-sided, seeded; exhaustive when 2**n <= n_resamples).
* :func:`bootstrap_ci` - seeded bootstrap confidence interval (1,000 resamples, 95 %) for any
  statistic of one sample or of paired samples; percentile, basic or BCa.
* :func:`label_swap_test` / :func:`aggregate_comparison` - the same for an aggregate metric
  (parity gap, bias score, ICAT, ...) recomputed by the task's own function on paired items.
* :func:`bh_adjust` - Benjamini-Hochberg adjusted p-values across a family of comparisons.

Every result records its seed and number of resamples. Conventions follow
``scipy.stats.permutation_test`` / ``scipy.stats.bootstrap`` (same p-value definition, same
resampling stream for a given seed), which the tests check against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import ndtr, ndtri

ALTERNATIVES = ("two-sided", "greater", "less")
CI_METHODS = ("percentile", "basic", "bca")
DEFAULT_PERMUTATIONS = 10_000
DEFAULT_BOOTSTRAP = 1_000


def _as_1d(name: str, values) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; need at least one item")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values; only finite values are allowed")
    return arr


def _check_common(n_resamples: int, seed: int, alternative: str | None = None) -> None:
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples!r}; must be a positive integer")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}; must be a non-negative integer")
    if alternative is not None and alternative not in ALTERNATIVES:
        raise ValueError(f"alternative={alternative!r}; allowed: {', '.join(ALTERNATIVES)}")


# --------------------------------------------------------------------------- permutation test


@dataclass(frozen=True)
class PermutationResult:
    """Outcome of :func:`paired_permutation_test` (all fields JSON-serialisable via ``to_dict``)."""

    statistic: float  # observed statistic of the differences (default: mean of x - y)
    pvalue: float
    n: int  # number of paired items
    n_resamples: int  # sign patterns evaluated (2**n when exact)
    exact: bool  # exhaustive enumeration of all 2**n sign patterns
    seed: int
    alternative: str
    method: str = "paired sign-flip permutation"

    def to_dict(self) -> dict:
        return asdict(self)


def _sign_patterns(n: int, exact: bool, n_resamples: int, rng: np.random.Generator, batch: int):
    """Yield batches of +-1 sign matrices [b, n]: all 2**n patterns when exact, else random."""
    if exact:
        total = 1 << n
        bits = np.arange(n, dtype=np.int64)
        for start in range(0, total, batch):
            codes = np.arange(start, min(start + batch, total), dtype=np.int64)
            yield 1.0 - 2.0 * ((codes[:, None] >> bits) & 1)
    else:
        for start in range(0, n_resamples, batch):
            b = min(batch, n_resamples - start)
            yield 1.0 - 2.0 * rng.integers(0, 2, size=(b, n))


def paired_permutation_test(
    x,
    y=None,
    *,
    statistic: str | Callable = "mean",
    n_resamples: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
    alternative: str = "two-sided",
    exact: bool | None = None,
    batch: int = 2048,
) -> PermutationResult:
    """Paired sign-flip permutation test on d = x - y (or on x alone when y is None).

    Under H0 the sign of each per-item difference is exchangeable. ``statistic`` is ``"mean"``
    (default) or a callable ``f(d, axis=-1)`` vectorised over the last axis. ``exact=None``
    enumerates all 2**n sign patterns when 2**n <= n_resamples (as scipy does), else draws
    ``n_resamples`` random patterns from ``numpy.random.default_rng(seed)``. P-values follow
    scipy.stats.permutation_test: one-sided counts with tolerance 100*eps*|observed|, +1
    correction for Monte-Carlo draws, two-sided = 2 * min(one-sided), clipped to 1.
    """
    d = _as_1d("x", x)
    if y is not None:
        yy = _as_1d("y", y)
        if yy.shape != d.shape:
            raise ValueError(f"x and y must pair item for item; got {d.size} and {yy.size} items")
        d = d - yy
    _check_common(n_resamples, seed, alternative)
    if statistic == "mean":
        stat = lambda a, axis=-1: np.mean(a, axis=axis)
    elif callable(statistic):
        stat = statistic
    else:
        raise ValueError(f"statistic={statistic!r}; allowed: 'mean' or a callable f(d, axis=-1)")
    n = d.size
    n_max = 2**n
    if exact is None:
        exact = n_max <= n_resamples
    elif exact and n > 24:
        raise ValueError(f"exact=True with n={n} items needs 2**{n} patterns; allowed: n <= 24")
    observed = float(stat(d, axis=-1))
    rng = np.random.default_rng(seed)
    null = np.concatenate(
        [np.asarray(stat(s * d, axis=-1), dtype=np.float64) for s in _sign_patterns(n, exact, n_resamples, rng, batch)]
    )
    used = n_max if exact else n_resamples
    return PermutationResult(
        statistic=observed, pvalue=_permutation_pvalue(null, observed, exact, alternative), n=n, n_resamples=used,
        exact=bool(exact), seed=int(seed), alternative=alternative,
    )


def _permutation_pvalue(null: np.ndarray, observed: float, exact: bool, alternative: str) -> float:
    """scipy.stats.permutation_test's p-value: tolerance 100*eps*|observed|, +1 for Monte-Carlo draws."""
    adjustment = 0 if exact else 1
    used = null.size
    gamma = abs(np.finfo(np.float64).eps * 100 * observed)
    p_less = (np.count_nonzero(null <= observed + gamma) + adjustment) / (used + adjustment)
    p_greater = (np.count_nonzero(null >= observed - gamma) + adjustment) / (used + adjustment)
    p = {"less": p_less, "greater": p_greater, "two-sided": 2 * min(p_less, p_greater)}[alternative]
    return float(min(max(p, 0.0), 1.0))


def label_swap_test(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    n_resamples: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
    alternative: str = "two-sided",
    exact: bool | None = None,
    tied=None,
) -> PermutationResult:
    """Paired permutation test of any statistic of two runs' paired items (SPEC section 12).

    ``statistic(swap)`` gets a boolean vector over the n paired items (True = the two runs' records
    of that item are exchanged) and returns e.g. aggregate(run) - aggregate(base) recomputed with the
    task's own aggregation. Under H0 the run labels are exchangeable within each item. The swap
    patterns are the sign patterns of :func:`paired_permutation_test` (same stream for a given seed,
    all 2**n when exact) and the p-value is scipy.stats.permutation_test's (``permutation_type=
    "samples"``); for the mean difference both tests coincide. Patterns on which the statistic is
    undefined (NaN) are dropped; ``n_resamples`` of the result counts the kept ones.

    ``tied`` (boolean vector) marks items whose two records are equal: swapping them changes
    nothing, so patterns are drawn over the m untied items only (all 2**m when 2**m <= n_resamples:
    the exact p-value over all 2**n patterns, each of which repeats 2**(n-m) times). With no untied
    item the statistic cannot move and p = 1.
    """
    _check_common(n_resamples, seed, alternative)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r}; must be a positive number of paired items")
    free = np.ones(n, dtype=bool) if tied is None else ~np.asarray(tied, dtype=bool)
    if free.shape != (n,):
        raise ValueError(f"tied must mark each of the n={n} items; got shape {free.shape}")
    m = int(free.sum())
    if exact is None:
        exact = 2**m <= n_resamples
    elif exact and m > 24:
        raise ValueError(f"exact=True with {m} untied items needs 2**{m} patterns; allowed: at most 24")
    observed = float(statistic(np.zeros(n, dtype=bool)))
    rng = np.random.default_rng(seed)

    def swaps(signs: np.ndarray):
        for row in signs:
            swap = np.zeros(n, dtype=bool)
            swap[free] = row < 0
            yield swap

    null = np.array([float(statistic(sw)) for signs in _sign_patterns(m, exact, n_resamples, rng, 2048)
                     for sw in swaps(signs)], dtype=np.float64)
    null = null[np.isfinite(null)]
    if null.size == 0 or not math.isfinite(observed):
        raise ValueError("the statistic is undefined (NaN) on the data or on every permutation")
    return PermutationResult(
        statistic=observed, pvalue=_permutation_pvalue(null, observed, exact, alternative), n=int(n),
        n_resamples=int(null.size), exact=bool(exact), seed=int(seed), alternative=alternative,
        method="paired label-swap permutation",
    )


# --------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapResult:
    """Outcome of :func:`bootstrap_ci`."""

    estimate: float  # statistic on the original sample(s)
    low: float
    high: float
    standard_error: float  # std (ddof=1) of the bootstrap distribution
    confidence_level: float
    method: str
    n: int
    n_resamples: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def _mean_stat(*samples, axis=-1):
    if len(samples) != 1:
        raise ValueError("statistic='mean' takes one sample; pass a callable for several paired samples")
    return np.mean(samples[0], axis=axis)


def bootstrap_ci(
    *samples,
    statistic: str | Callable = "mean",
    n_resamples: int = DEFAULT_BOOTSTRAP,
    confidence_level: float = 0.95,
    method: str = "percentile",
    seed: int = 0,
    nan_policy: str = "propagate",
) -> BootstrapResult:
    """Bootstrap CI of ``statistic(*samples, axis=-1)``; several samples are resampled as pairs.

    Items (rows shared by all samples) are drawn with replacement via
    ``numpy.random.default_rng(seed).integers(0, n, (n_resamples, n))`` - the same stream as
    ``scipy.stats.bootstrap(..., paired=True, rng=seed)``. ``method``: ``percentile`` (default),
    ``basic`` or ``bca`` (bias-corrected and accelerated; jackknife acceleration over items,
    Efron & Tibshirani 14.3). Quantiles use linear interpolation. Any statistic works (median,
    a difference of two preference rates, ...) as long as it is vectorised over the last axis.
    ``nan_policy="omit"`` drops resamples on which the statistic is undefined (an aggregate over a
    resample without items of some category); ``n_resamples`` of the result counts the kept ones.
    """
    if nan_policy not in ("propagate", "omit"):
        raise ValueError(f"nan_policy={nan_policy!r}; allowed: propagate, omit")
    if not samples:
        raise ValueError("bootstrap_ci needs at least one sample")
    data = [_as_1d(f"sample {i}", s) for i, s in enumerate(samples)]
    n = data[0].size
    if any(s.size != n for s in data):
        raise ValueError(f"paired samples must have equal length; got {[s.size for s in data]}")
    _check_common(n_resamples, seed)
    if method not in CI_METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(CI_METHODS)}")
    if not 0.0 < confidence_level < 1.0:
        raise ValueError(f"confidence_level={confidence_level!r}; must lie strictly between 0 and 1")
    if statistic == "mean":
        stat = _mean_stat
    elif callable(statistic):
        stat = statistic
    else:
        raise ValueError(f"statistic={statistic!r}; allowed: 'mean' or a callable f(*samples, axis=-1)")
    if method == "bca" and n < 2:
        raise ValueError("method='bca' needs at least 2 items for the jackknife")

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, (n_resamples, n))
    theta_b = np.asarray(stat(*[s[idx] for s in data], axis=-1), dtype=np.float64)
    theta = float(stat(*data, axis=-1))
    if nan_policy == "omit":
        if method == "bca":
            raise ValueError("nan_policy='omit' works with method='percentile' or 'basic'")
        theta_b = theta_b[np.isfinite(theta_b)]
        if theta_b.size == 0:
            raise ValueError("the statistic is undefined (NaN) on every bootstrap resample")
        n_resamples = int(theta_b.size)
    alpha = (1.0 - confidence_level) / 2.0

    if method == "bca":
        # z0: bias correction from the share of bootstrap values below the estimate (ties half).
        share = (np.count_nonzero(theta_b < theta) + np.count_nonzero(theta_b <= theta)) / (2.0 * n_resamples)
        z0 = ndtri(share)
        theta_j = np.empty(n)
        step = max(1, 2_000_000 // n)  # leave-one-out rows per chunk: bounded memory for large n
        for start in range(0, n, step):
            rows = np.arange(start, min(start + step, n))
            cols = np.arange(n - 1)
            jack_idx = cols[None, :] + (cols[None, :] >= rows[:, None])  # row i skips item i
            theta_j[rows] = np.asarray(stat(*[s[jack_idx] for s in data], axis=-1), dtype=np.float64)
        u = (n - 1) * (theta_j.mean() - theta_j)
        num, den = np.sum(u**3) / n**3, np.sum(u**2) / n**2
        a_hat = num / den**1.5 / 6.0 if den > 0 else 0.0
        z_lo, z_hi = ndtri(alpha), -ndtri(alpha)
        q_lo = ndtr(z0 + (z0 + z_lo) / (1 - a_hat * (z0 + z_lo)))
        q_hi = ndtr(z0 + (z0 + z_hi) / (1 - a_hat * (z0 + z_hi)))
        if not (np.isfinite(q_lo) and np.isfinite(q_hi)):
            raise ValueError("BCa interval undefined (degenerate bootstrap distribution); use method='percentile'")
    else:
        q_lo, q_hi = alpha, 1.0 - alpha
    low, high = (float(v) for v in np.quantile(theta_b, [q_lo, q_hi]))
    if method == "basic":
        low, high = 2 * theta - high, 2 * theta - low
    return BootstrapResult(
        estimate=theta, low=low, high=high, standard_error=float(np.std(theta_b, ddof=1)) if n_resamples > 1 else 0.0,
        confidence_level=float(confidence_level), method=method, n=n, n_resamples=int(n_resamples), seed=int(seed),
    )


# --------------------------------------------------------------------------- multiple testing


def bh_adjust(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg (step-up FDR) adjusted p-values, in the input order.

    p_adj(i) = min_{k >= rank(i)} p_(k) * m / k, clipped to 1 (same arithmetic as
    ``statsmodels.stats.multitest.multipletests(method="fdr_bh")``).
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be one-dimensional; got shape {p.shape}")
    if p.size == 0:
        return p.copy()
    if np.any(~np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        bad = float(p[~(np.isfinite(p) & (p >= 0) & (p <= 1))][0])
        raise ValueError(f"p-value {bad!r} out of range; allowed: finite values in [0, 1]")
    order = np.argsort(p, kind="mergesort")
    m = p.size
    raw = p[order] / (np.arange(1, m + 1) / float(m))
    adj = np.minimum.accumulate(raw[::-1])[::-1]
    adj = np.minimum(adj, 1.0)
    out = np.empty_like(adj)
    out[order] = adj
    return out


# --------------------------------------------------------------------------- one-call comparison


def paired_comparison(
    a,
    b,
    *,
    name: str = "",
    n_permutations: int = DEFAULT_PERMUTATIONS,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    confidence_level: float = 0.95,
    ci_method: str = "percentile",
    seed: int = 0,
) -> dict:
    """Intervened ``b`` vs baseline ``a`` per item: mean difference b - a, its bootstrap CI and
    the paired permutation p-value, with every seed and resample count recorded."""
    a_arr, b_arr = _as_1d("a", a), _as_1d("b", b)
    perm = paired_permutation_test(b_arr, a_arr, n_resamples=n_permutations, seed=seed)
    ci = bootstrap_ci(b_arr - a_arr, n_resamples=n_bootstrap, confidence_level=confidence_level,
                      method=ci_method, seed=seed)
    return {
        "name": name, "n": int(a_arr.size), "mean_a": float(a_arr.mean()), "mean_b": float(b_arr.mean()),
        "delta": perm.statistic, "ci_low": ci.low, "ci_high": ci.high, "confidence_level": ci.confidence_level,
        "ci_method": ci.method, "pvalue": perm.pvalue, "exact": perm.exact, "n_permutations": perm.n_resamples,
        "n_bootstrap": ci.n_resamples, "seed": seed,
    }


def bh_family(results: list[dict], key: str = "pvalue", out_key: str = "pvalue_bh") -> list[dict]:
    """Add Benjamini-Hochberg adjusted p-values across one family of comparisons (new dicts)."""
    adj = bh_adjust([r[key] for r in results])
    return [{**r, out_key: float(p), "bh_family_size": len(results)} for r, p in zip(results, adj)]


def aggregate_comparison(
    a_items: Sequence,
    b_items: Sequence,
    aggregate: Callable[[list], float],
    *,
    name: str = "",
    n_permutations: int = DEFAULT_PERMUTATIONS,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Run ``b`` vs base ``a`` on an aggregate metric (SPEC section 12), items paired by position.

    delta = aggregate(b) - aggregate(a); CI: percentile bootstrap of delta over resampled paired
    items (resamples where the aggregate is undefined are dropped and counted; [0, 0] without a call
    when every item is equal in both runs); p-value: paired label-swap permutation test over the
    items that differ (equal items cannot move the statistic). ``aggregate`` is the task's own aggregation function, called on
    lists of per-item values exactly as lm-eval calls it.
    """
    n = len(a_items)
    if n != len(b_items) or n == 0:
        raise ValueError(f"paired items must be non-empty and of equal length; got {n} and {len(b_items)}")
    a_items, b_items = list(a_items), list(b_items)

    def delta_of(idx) -> float:
        return float(aggregate([b_items[i] for i in idx])) - float(aggregate([a_items[i] for i in idx]))

    def boot_stat(idx, axis=-1):
        idx = np.asarray(idx, dtype=np.int64)
        return delta_of(idx) if idx.ndim == 1 else np.array([delta_of(row) for row in idx])

    def swap_stat(swap: np.ndarray) -> float:
        a_perm = [b if s else a for a, b, s in zip(a_items, b_items, swap)]
        b_perm = [a if s else b for a, b, s in zip(a_items, b_items, swap)]
        return float(aggregate(b_perm)) - float(aggregate(a_perm))

    mean_a, mean_b = float(aggregate(a_items)), float(aggregate(b_items))
    if not (math.isfinite(mean_a) and math.isfinite(mean_b)):
        raise ValueError(f"aggregate undefined on the paired items (base {mean_a}, run {mean_b})")
    tied = [a == b for a, b in zip(a_items, b_items)]  # NaN != NaN: such items stay free (conservative)
    if all(tied):  # identical runs on these items: every resample's delta is exactly 0
        ci = BootstrapResult(estimate=0.0, low=0.0, high=0.0, standard_error=0.0, confidence_level=confidence_level,
                             method="percentile", n=n, n_resamples=int(n_bootstrap), seed=int(seed))
    else:
        ci = bootstrap_ci(np.arange(n, dtype=np.float64), statistic=boot_stat, n_resamples=n_bootstrap,
                          confidence_level=confidence_level, seed=seed, nan_policy="omit")
    perm = label_swap_test(swap_stat, n, n_resamples=n_permutations, seed=seed, tied=tied)
    return {
        "name": name, "n": n, "mean_a": mean_a, "mean_b": mean_b, "delta": mean_b - mean_a,
        "ci_low": ci.low, "ci_high": ci.high, "confidence_level": ci.confidence_level, "ci_method": ci.method,
        "pvalue": perm.pvalue, "exact": perm.exact, "n_permutations": perm.n_resamples,
        "n_bootstrap": ci.n_resamples, "seed": seed,
    }
