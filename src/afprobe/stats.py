"""Paired statistics over queries: bootstrap intervals and sign-flip permutation tests.

Each query is run under both tiers, so the unit of analysis is the query: intervals resample queries, and the
permutation test flips the sign of each query's free-minus-paid difference (exchangeable under the null that the
tier makes no difference).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

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
    method: str = "bootstrap-percentile"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0


def bootstrap_mean(
    values: Float[np.ndarray, " n"], *, n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> Estimate:
    """Mean of `values` with a percentile bootstrap interval (resampling the values, i.e. the queries)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("bootstrap_mean needs a non-empty 1-D array")
    rng = np.random.default_rng(seed)
    n = values.size
    means = np.empty(n_boot)
    # Chunked so 10k x n indices never sit in memory at once for large n.
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Estimate(mean=float(values.mean()), ci_low=float(low), ci_high=float(high), n=n, confidence=confidence)


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
) -> Estimate:
    """Mean of a - b over paired items, with a bootstrap interval over items and a sign-flip p-value."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    differences = a - b
    estimate = bootstrap_mean(differences, n_boot=n_boot, confidence=confidence, seed=seed)
    p_value = sign_flip_p_value(differences, n_perm=n_perm, seed=seed + 1)
    return Estimate(**{**estimate.to_dict(), "p_value": p_value})


def benjamini_hochberg(p: Tensor) -> Tensor:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input's order."""
    m = p.numel()
    order = torch.argsort(p)
    ranked = p[order] * m / torch.arange(1, m + 1, dtype=p.dtype)
    adjusted = torch.flip(torch.cummin(torch.flip(ranked, [0]), 0).values, [0]).clamp(max=1.0)
    q = torch.empty_like(p)
    q[order] = adjusted
    return q


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
