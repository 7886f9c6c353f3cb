from __future__ import annotations

import numpy as np
import pytest

from afprobe.stats import (
    DEFAULT_INTERVAL,
    INTERVAL_METHODS,
    mean_estimate,
    mean_interval,
    paired_difference,
    ratio_of_means,
    sign_flip_p_value,
    simulated_coverage,
)


def test_known_effect_is_recovered():
    rng = np.random.default_rng(1)
    paid = rng.normal(0.0, 1.0, 200)
    free = paid + rng.normal(0.5, 1.0, 200)
    estimate = paired_difference(free, paid, n_boot=4000, n_perm=4000)
    assert estimate.ci_low < 0.5 < estimate.ci_high
    assert estimate.excludes_zero() and estimate.p_value < 0.001


def test_null_interval_covers_zero_at_the_nominal_rate():
    rng = np.random.default_rng(2)
    covered, rejected = 0, 0
    trials = 200
    for trial in range(trials):
        a, b = rng.normal(size=40), rng.normal(size=40)
        estimate = paired_difference(a, b, n_boot=1000, n_perm=1000, seed=trial)
        covered += not estimate.excludes_zero()
        rejected += estimate.p_value < 0.05
    assert 0.88 <= covered / trials <= 0.99
    assert rejected / trials <= 0.10


def test_exact_sign_flip_for_small_n():
    assert sign_flip_p_value(np.ones(4)) == pytest.approx(2 / 16)
    assert sign_flip_p_value(np.zeros(5)) == 1.0


def test_zero_differences_give_a_zero_interval():
    values = np.linspace(-1, 1, 30)
    estimate = paired_difference(values, values)
    assert (estimate.mean, estimate.ci_low, estimate.ci_high, estimate.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError):
        mean_estimate(np.array([]))
    with pytest.raises(ValueError, match="differ in shape"):
        paired_difference(np.ones(3), np.ones(4))


# The sizes afprobe's defaults use: the organisms experiment 6 pairs, patching 8, steering 20; and n = 50.
COVERAGE_SIZES = (6, 8, 20, 50)
COVERAGE_SIMULATIONS = 2000  # the coverage's standard error is about 0.5 points


def test_the_default_interval_covers_at_least_93_percent_at_the_default_sizes(capsys):
    """Simulated coverage of every interval method (printed, `pytest -s`); the default must reach 93% for normal and
    heavy-tailed data at each size afprobe uses. Skewed data is printed, not required: the README gives its numbers."""
    table = {}
    for distribution in ("normal", "heavy-tailed", "skewed"):
        for n in COVERAGE_SIZES:
            table[distribution, n] = {
                method: simulated_coverage(
                    method, n, distribution, n_sim=COVERAGE_SIMULATIONS if method == DEFAULT_INTERVAL else 500,
                    n_boot=1000, seed=n,
                )
                for method in INTERVAL_METHODS
            }  # fmt: skip
    with capsys.disabled():
        print(f"\ncoverage of nominal 95% intervals (default: {DEFAULT_INTERVAL})")
        for (distribution, n), row in table.items():
            print(f"  {distribution:>12} n={n:<3}", "  ".join(f"{m} {c:.3f}" for m, c in row.items()))
    for distribution in ("normal", "heavy-tailed"):
        for n in COVERAGE_SIZES:
            assert table[distribution, n][DEFAULT_INTERVAL] >= 0.93, (distribution, n, table[distribution, n])
    # The reason the default is not the percentile bootstrap: it undercovers at the small sizes.
    assert table["normal", 6]["percentile"] < 0.93


def test_every_interval_method_brackets_the_mean_and_the_estimate_names_it():
    values = np.random.default_rng(3).normal(1.0, 1.0, 12)
    for method in INTERVAL_METHODS:
        low, high = mean_interval(values, method=method, n_boot=2000)
        assert low < values.mean() < high
        assert mean_estimate(values, method=method, n_boot=500).method == method
    assert mean_estimate(values).method == DEFAULT_INTERVAL
    with pytest.raises(ValueError, match="unknown interval method"):
        mean_interval(values, method="wald")


def test_a_recovery_is_a_ratio_of_means_with_an_interval():
    totals = np.array([1.0, 2.0, 3.0, 2.0])
    deltas = np.stack([np.zeros(4), totals, totals / 2], axis=1)
    est = ratio_of_means(deltas, totals, n_boot=500, seed=0)
    assert est["mean"].tolist() == pytest.approx([0.0, 1.0, 0.5])
    assert np.all(est["ci_low"] <= est["mean"] + 1e-12) and np.all(est["mean"] <= est["ci_high"] + 1e-12)
    assert np.isnan(ratio_of_means(deltas, np.zeros(4), n_boot=10, seed=0)["mean"]).all()


def test_a_recovery_of_a_gap_indistinguishable_from_zero_has_an_unbounded_interval():
    totals = np.array([1.0, -1.2, 0.9, -0.8, 0.3])  # mean +0.04: resamples give it either sign
    deltas = np.stack([totals / 2, np.zeros(5)], axis=1)
    est = ratio_of_means(deltas, totals, n_boot=2000, seed=0)
    assert est["mean"].tolist() == pytest.approx([0.5, 0.0])
    assert np.isneginf(est["ci_low"]).all() and np.isposinf(est["ci_high"]).all()


def test_a_crossed_design_interval_covers_when_phrasings_vary_too(capsys):
    """Queries x phrasings: an interval over queries alone leaves out the phrasings' own variance and misses the
    true (zero) difference most of the time; the crossed bootstrap resamples both and covers."""
    from afprobe.stats import crossed_difference

    rng = np.random.default_rng(0)
    side = np.array([True] * 6 + [False] * 6)
    crossed = queries_only = 0
    n_sim = 300
    for s in range(n_sim):
        table = rng.normal(0, 1, (20, 1)) + rng.normal(0, 0.5, (1, 12)) + rng.normal(0, 0.5, (20, 12))
        estimate = crossed_difference(table, side, n_boot=500, seed=s)
        crossed += estimate.ci_low <= 0 <= estimate.ci_high
        per_query = table[:, side].mean(1) - table[:, ~side].mean(1)
        low, high = mean_interval(per_query)
        queries_only += low <= 0 <= high
    with capsys.disabled():
        print(
            f"\ncoverage, 20 queries x 12 phrasings: crossed {crossed / n_sim:.0%}, "
            f"queries only {queries_only / n_sim:.0%}"
        )
    assert crossed / n_sim >= 0.93
    assert queries_only / n_sim < 0.6
    # A large planted difference is found, and its permutation p is the smallest the 924 arrangements allow.
    table = rng.normal(0, 1, (20, 12)) + 5.0 * side
    estimate = crossed_difference(table, side, n_boot=500)
    assert estimate.ci_low > 3 and estimate.p_value == pytest.approx(2 / 924)
    with pytest.raises(ValueError, match="both sides"):
        crossed_difference(table, [True] * 12)


def test_holm_controls_the_family_and_keeps_the_order():
    from afprobe.stats import holm

    assert holm([0.01, 0.04, 0.03, 0.5]).tolist() == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([]).size == 0
    # Under the global null, the chance that any adjusted p of a 20-member family falls below 0.05 stays near 5%.
    rng = np.random.default_rng(0)
    false_alarms = np.mean([holm(rng.uniform(size=20)).min() < 0.05 for _ in range(4000)])
    assert false_alarms < 0.06
