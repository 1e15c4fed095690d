"""Paired comparisons: bootstrap interval, Wilcoxon p-value, alignment of users."""

import numpy as np
import pytest

from metarec import stats


def test_bootstrap_interval_of_a_constant_difference_is_that_constant():
    lo, hi = stats.paired_bootstrap_ci(np.full(50, -0.25))
    assert lo == pytest.approx(-0.25) and hi == pytest.approx(-0.25)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.normal(0.1, 1.0, 50)
    big = rng.normal(0.1, 1.0, 5000)
    lo_s, hi_s = stats.paired_bootstrap_ci(small, n_boot=2000)
    lo_b, hi_b = stats.paired_bootstrap_ci(big, n_boot=2000)
    assert lo_s < small.mean() < hi_s and lo_b < big.mean() < hi_b
    assert hi_b - lo_b < (hi_s - lo_s) / 5
    # the normal-theory width 2 * 1.96 * sd / sqrt(n), within 10%
    assert hi_b - lo_b == pytest.approx(2 * 1.96 * big.std() / np.sqrt(big.size), rel=0.1)


def test_wilcoxon_matches_the_exact_value_by_hand():
    # five positive differences: the two-sided exact p is 2 * (1/2)^5 = 0.0625
    assert stats.wilcoxon_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(0.0625)
    assert stats.wilcoxon_p([0.0, 0.0]) == 1.0


def test_paired_comparison_aligns_units_and_skips_missing_values():
    a = {"unit": ["0:1", "0:2", "1:1", "1:9"], "mae": [1.0, 2.0, 3.0, 5.0]}
    b = {"unit": ["1:1", "0:2", "0:1"], "mae": [2.5, None, 0.5]}
    c = stats.paired_comparison(a, b, "mae", n_boot=200)
    assert c["n"] == 2  # 0:2 has no value in b, 1:9 is not in b
    assert c["mean_diff"] == pytest.approx(((1.0 - 0.5) + (3.0 - 2.5)) / 2)
    assert c["mean_a"] == pytest.approx(2.0) and c["mean_b"] == pytest.approx(1.5)
