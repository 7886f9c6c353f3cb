"""Paired statistics over queries: intervals for means, sign-flip permutation tests, the random-null comparison.

Each query is run under both tiers, so the unit of analysis is the query: intervals are over queries, and the
permutation test flips the sign of each query's free-minus-paid difference (exchangeable under the null that the
tier makes no difference).

Intervals for a mean are t intervals by default (`DEFAULT_INTERVAL`): measured by `simulated_coverage` at the sizes
afprobe's defaults use (6, 8, 20 and 50 queries), nominal 95% percentile-bootstrap intervals covered 87-95%, BCa
84-94%, the t interval 95-97% for normal and heavy-tailed (t, 3 df) data and 88-93% for skewed data, where the
studentized bootstrap covers 93-94% (`tests/test_stats.py` prints the table).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap interval and, for differences, a two-sided permutation p-value."""

    mean: float
    ci_low: float
    ci_high: float
    n: int
    p_value: float | None = None
    confidence: float = 0.95
    method: str = "t"  # how the interval was made (`INTERVAL_METHODS`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0


# -- intervals for a mean -------------------------------------------------------------------------------------------

IntervalMethod = Literal["percentile", "bca", "studentized", "t"]
INTERVAL_METHODS: tuple[IntervalMethod, ...] = ("percentile", "bca", "studentized", "t")
DEFAULT_INTERVAL: IntervalMethod = "t"


def _mean_estimates(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Means and standard deviations of `n_boot` resamples of `values` (chunked: n_boot x n indices never sit in
    memory at once for large n)."""
    n = values.size
    means, sds = np.empty(n_boot), np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        resampled = values[rng.integers(0, n, size=(stop - start, n))]
        means[start:stop] = resampled.mean(axis=1)
        sds[start:stop] = resampled.std(axis=1, ddof=1) if n > 1 else 0.0
    return means, sds


def mean_interval(
    values: Float[np.ndarray, " n"],
    *,
    method: IntervalMethod = DEFAULT_INTERVAL,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """A `confidence` interval for the mean of `values` (queries, or per-query differences).

    percentile: quantiles of the bootstrap means (too narrow at small n: about sqrt((n-1)/n) of the right width and
    normal rather than t quantiles); bca: bias-corrected and accelerated percentile (Efron 1987); studentized: the
    bootstrap-t; t: mean +- t_{n-1} x SE. `tests/test_stats.py` measures each one's coverage.
    """
    from scipy import stats as scipy_stats

    values = np.asarray(values, dtype=np.float64)
    n = values.size
    mean = float(values.mean())
    alpha = (1 - confidence) / 2
    if n < 2 or np.all(values == values[0]):
        return mean, mean  # one value, or no spread: nothing to resample
    se = float(values.std(ddof=1) / np.sqrt(n))
    if method == "t":
        half = float(scipy_stats.t.ppf(1 - alpha, n - 1)) * se
        return mean - half, mean + half
    rng = np.random.default_rng(seed)
    means, sds = _mean_estimates(values, n_boot, rng)
    if method == "percentile":
        low, high = np.quantile(means, [alpha, 1 - alpha])
        return float(low), float(high)
    if method == "bca":
        below = np.mean(means < mean) + 0.5 * np.mean(means == mean)
        z0 = float(scipy_stats.norm.ppf(np.clip(below, 1 / (n_boot + 1), n_boot / (n_boot + 1))))
        jackknife = (values.sum() - values) / (n - 1)
        spread = jackknife.mean() - jackknife
        denominator = 6.0 * float(np.sum(spread**2)) ** 1.5
        acceleration = float(np.sum(spread**3)) / denominator if denominator > 0 else 0.0
        z = scipy_stats.norm.ppf([alpha, 1 - alpha])
        adjusted = scipy_stats.norm.cdf(z0 + (z0 + z) / (1 - acceleration * (z0 + z)))
        low, high = np.quantile(means, adjusted)
        return float(low), float(high)
    if method == "studentized":
        usable = sds > 0  # resamples of one repeated value have no standard error
        t_star = (means[usable] - mean) / (sds[usable] / np.sqrt(n))
        q_low, q_high = np.quantile(t_star, [alpha, 1 - alpha])
        return mean - float(q_high) * se, mean - float(q_low) * se
    raise ValueError(f"unknown interval method {method!r}: choose one of {', '.join(INTERVAL_METHODS)}")


def simulated_coverage(
    method: IntervalMethod,
    n: int,
    distribution: Literal["normal", "heavy-tailed", "skewed"],
    *,
    n_sim: int = 2000,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> float:
    """The fraction of `n_sim` simulated samples of size `n` whose interval contains the true mean (0).

    normal: N(0, 1); heavy-tailed: Student t with 3 degrees of freedom; skewed: a centred exponential.
    """
    rng = np.random.default_rng(seed)
    if distribution == "normal":
        samples = rng.standard_normal((n_sim, n))
    elif distribution == "heavy-tailed":
        samples = rng.standard_t(3, size=(n_sim, n))
    elif distribution == "skewed":
        samples = rng.exponential(1.0, size=(n_sim, n)) - 1.0
    else:
        raise ValueError(f"unknown distribution {distribution!r}")
    hits = 0
    for i, sample in enumerate(samples):
        low, high = mean_interval(sample, method=method, n_boot=n_boot, confidence=confidence, seed=seed + 1 + i)
        hits += low <= 0.0 <= high
    return hits / n_sim


def mean_estimate(
    values: Float[np.ndarray, " n"],
    *,
    method: IntervalMethod | None = None,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Mean of `values` (one per query) with its interval (`mean_interval`; default `DEFAULT_INTERVAL`)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("mean_estimate needs a non-empty 1-D array")
    method = method or DEFAULT_INTERVAL
    low, high = mean_interval(values, method=method, n_boot=n_boot, confidence=confidence, seed=seed)
    return Estimate(
        mean=float(values.mean()), ci_low=low, ci_high=high, n=values.size, confidence=confidence, method=method
    )


def sign_flip_p_value(differences: Float[np.ndarray, " n"], *, n_perm: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of mean(differences) under random sign flips; exact enumeration for n <= 14."""
    d = np.asarray(differences, dtype=np.float64)
    n = d.size
    observed = abs(d.mean())
    if observed == 0:
        return 1.0
    tolerance = 1e-12 * max(1.0, observed)
    if n <= 14:
        signs = np.array(list(itertools.product((-1.0, 1.0), repeat=n)))
        null = np.abs(signs @ d) / n
        return float(np.mean(null >= observed - tolerance))
    rng = np.random.default_rng(seed)
    hits = 0
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_perm, chunk):
        size = min(chunk, n_perm - start)
        signs = rng.choice((-1.0, 1.0), size=(size, n))
        hits += int(np.sum(np.abs(signs @ d) / n >= observed - tolerance))
    return (hits + 1) / (n_perm + 1)


def paired_difference(
    a: Float[np.ndarray, " n"],
    b: Float[np.ndarray, " n"],
    *,
    n_boot: int = 10_000,
    n_perm: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    method: IntervalMethod | None = None,
) -> Estimate:
    """Mean of a - b over paired items, with an interval over items (`mean_estimate`) and a sign-flip p-value."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    differences = a - b
    estimate = mean_estimate(differences, method=method, n_boot=n_boot, confidence=confidence, seed=seed)
    p_value = sign_flip_p_value(differences, n_perm=n_perm, seed=seed + 1)
    return Estimate(**{**estimate.to_dict(), "p_value": p_value})


def ratio_of_means(
    deltas: np.ndarray, totals: np.ndarray, *, n_boot: int, seed: int, confidence: float = 0.95
) -> dict[str, np.ndarray]:
    """mean(deltas) / mean(totals) over queries (a ratio of means: per-query ratios explode where a query's own
    total is near zero), with a bootstrap interval resampling queries. Patching's recoveries and mediation shares,
    steering's fraction of the gap remaining.

    deltas: `[queries, ...cells]` (patched minus receiver); totals: `[queries]` (donor minus receiver, the gap).
    When more than (1 - confidence) / 2 of the resamples give the gap the other sign (or zero), the gap is not
    distinguishable from zero at that level and the interval is unbounded (-inf, inf): no resample is dropped.
    """
    n = deltas.shape[0]
    shape = deltas.shape[1:]
    if abs(float(np.mean(totals))) < 1e-9:
        nothing = np.full(shape, np.nan)
        return {"mean": nothing, "ci_low": nothing.copy(), "ci_high": nothing.copy()}
    flat = deltas.reshape(n, -1).astype(np.float64)
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, n))
    for b, idx in enumerate(rng.integers(0, n, size=(n_boot, n))):
        np.add.at(counts[b], idx, 1.0)
    point = flat.mean(0) / totals.mean()
    denominators = counts @ totals.astype(np.float64)
    alpha = (1 - confidence) / 2
    if n > 1 and np.mean(np.sign(denominators) != np.sign(totals.mean())) > alpha:
        unbounded = np.full(shape, np.inf)
        return {"mean": point.reshape(shape), "ci_low": -unbounded, "ci_high": unbounded}
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = (counts @ flat) / denominators[:, None]
    low, high = (np.quantile(boot, [alpha, 1 - alpha], axis=0)) if n > 1 else (point, point)
    return {
        "mean": point.reshape(shape),
        "ci_low": np.asarray(low).reshape(shape),
        "ci_high": np.asarray(high).reshape(shape),
    }


def crossed_difference(
    table: Float[np.ndarray, "queries cues"],
    first: Sequence[bool],
    *,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Mean over queries and cues of the `first` cues minus the other cues, where every query is run with every cue
    (a crossed design: the organisms' held-out phrasings, contrast sentences under several requests).

    Queries and cues are both samples, so both vary in the interval: each bootstrap resample draws queries, and cues
    within each side, with replacement (Owen's pigeonhole bootstrap, conservative for crossed designs); the interval
    is mean +- t x that standard error with min(queries - 1, cues - 2) degrees of freedom. The p-value permutes which
    cues are `first` (exact below 10,000 arrangements): a test over cues, the coarser of the two samples.
    """
    from scipy import stats as scipy_stats

    values = np.asarray(table, dtype=np.float64)
    side = np.asarray(first, dtype=bool)
    if values.ndim != 2 or values.shape[1] != side.size or side.all() or not side.any():
        raise ValueError("crossed_difference needs a [queries, cues] table and cues on both sides")
    n_queries, n_cues = values.shape
    per_cue = values.mean(axis=0)
    mean = float(per_cue[side].mean() - per_cue[~side].mean())
    rng = np.random.default_rng(seed)
    a, b = np.flatnonzero(side), np.flatnonzero(~side)
    boot = np.empty(n_boot)
    for i in range(n_boot):
        rows = values[rng.integers(0, n_queries, n_queries)]
        boot[i] = rows[:, rng.choice(a, a.size)].mean() - rows[:, rng.choice(b, b.size)].mean()
    se = float(boot.std(ddof=1))
    df = max(1, min(n_queries - 1, n_cues - 2))
    half = float(scipy_stats.t.ppf(1 - (1 - confidence) / 2, df)) * se
    arrangements = list(itertools.combinations(range(n_cues), a.size))
    if len(arrangements) > 10_000:
        arrangements = [tuple(rng.permutation(n_cues)[: a.size]) for _ in range(10_000)]
    total = per_cue.sum()
    null = np.array([per_cue[list(c)].sum() / a.size - (total - per_cue[list(c)].sum()) / b.size for c in arrangements])
    p_value = float(np.mean(np.abs(null) >= abs(mean) - 1e-12 * max(1.0, abs(mean))))
    return Estimate(
        mean=mean,
        ci_low=mean - half,
        ci_high=mean + half,
        n=n_queries,
        p_value=p_value,
        confidence=confidence,
        method="crossed bootstrap (queries x cues), t",
    )


def benjamini_hochberg(p: Tensor) -> Tensor:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input's order."""
    m = p.numel()
    order = torch.argsort(p)
    ranked = p[order] * m / torch.arange(1, m + 1, dtype=p.dtype)
    adjusted = torch.flip(torch.cummin(torch.flip(ranked, [0]), 0).values, [0]).clamp(max=1.0)
    q = torch.empty_like(p)
    q[order] = adjusted
    return q


def holm(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input's order: family-wise error control over the comparisons a run
    declares (reject where the adjusted p < alpha)."""
    values = np.asarray(p, dtype=np.float64)
    m = values.size
    order = np.argsort(values, kind="stable")
    stepped = np.maximum.accumulate(values[order] * (m - np.arange(m)))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


@dataclass(frozen=True)
class RandomNullComparison:
    """An effect beside the same effect measured for random directions, subspaces or feature sets.

    null_p95: the 95th percentile of |null|; p_value: (1 + #{|null| >= |value|}) / (1 + n_null), the smallest
    possible being 1 / (1 + n_null); beyond: |value| above null_p95 and, when an interval is given, the interval
    excluding zero. With no null draws, null_p95 and p_value are None and beyond is False.
    """

    value: float
    null_p95: float | None
    p_value: float | None
    beyond: bool
    n_null: int


def compare_with_random_null(
    value: float, null: Sequence[float] | np.ndarray, interval: tuple[float, float] | None = None
) -> RandomNullComparison:
    """Is `value` larger in magnitude than what the random draws `null` give? (The one rule afprobe uses for
    "beyond random" in steering, mediation and SAE feature rows.)"""
    magnitudes = np.abs(np.asarray(null, dtype=np.float64))
    if magnitudes.size == 0:
        return RandomNullComparison(value=value, null_p95=None, p_value=None, beyond=False, n_null=0)
    p95 = float(np.quantile(magnitudes, 0.95))
    p_value = (1 + int(np.sum(magnitudes >= abs(value)))) / (1 + magnitudes.size)
    beyond = bool(np.isfinite(value) and abs(value) > p95)
    if interval is not None:
        low, high = interval
        beyond = beyond and (low > 0 or high < 0)
    return RandomNullComparison(value=value, null_p95=p95, p_value=p_value, beyond=beyond, n_null=int(magnitudes.size))
