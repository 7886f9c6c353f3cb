from __future__ import annotations

import numpy as np
import pytest

from afprobe.stats import bootstrap_mean, paired_difference, sign_flip_p_value


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
        bootstrap_mean(np.array([]))
    with pytest.raises(ValueError, match="differ in shape"):
        paired_difference(np.ones(3), np.ones(4))
