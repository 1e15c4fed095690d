"""Poisson sampling of users with static shapes."""

import math

import numpy as np
import pytest

from metarec.data.poisson import poisson_capacity, poisson_sample


def test_inclusion_rate_independence_and_shapes():
    n, q, cap, draws = 300, 0.1, poisson_capacity(300, 0.1, multiple=8), 2000
    assert cap % 8 == 0 and cap >= 30 + 5 * math.sqrt(300 * 0.1 * 0.9)
    rng = np.random.default_rng(0)
    hits = np.zeros(n)
    sizes = []
    for _ in range(draws):
        d = poisson_sample(rng, n, q, cap)
        assert d.indices.shape == d.weights.shape == (cap,)
        real = d.indices[d.weights > 0]
        assert len(real) == d.n_sampled and d.truncated == 0
        assert np.all(np.diff(real) > 0)  # distinct users, sorted
        assert np.all(d.indices[d.weights == 0] == 0)
        hits[real] += 1
        sizes.append(d.n_sampled)
    # every user's inclusion frequency is Binomial(draws, q): within 5 std of q for all users
    sd = math.sqrt(q * (1 - q) / draws)
    assert np.all(np.abs(hits / draws - q) < 5 * sd)
    # the total is Binomial(n, q): mean and variance
    assert np.mean(sizes) == pytest.approx(n * q, rel=0.02)
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.15)


def test_seeded_and_truncation_counted_never_silent():
    a = poisson_sample(np.random.default_rng([3, 7]), 100, 0.5, 60)
    b = poisson_sample(np.random.default_rng([3, 7]), 100, 0.5, 60)
    np.testing.assert_array_equal(a.indices, b.indices)
    small = poisson_sample(np.random.default_rng(1), 100, 0.5, 10)
    assert small.weights.sum() == 10
    assert small.truncated == small.n_sampled - 10 > 0
    assert len(np.unique(small.indices)) == 10


def test_capacity_limits_and_errors():
    assert poisson_capacity(10, 1.0) == 10
    assert poisson_capacity(10, 0.99, multiple=8) == 16
    assert poisson_capacity(1000, 0.001, n_std=0) == 1
    with pytest.raises(ValueError, match="rate"):
        poisson_capacity(10, 0.0)
    with pytest.raises(ValueError, match="capacity"):
        poisson_sample(np.random.default_rng(0), 10, 0.5, 0)
