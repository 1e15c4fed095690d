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


def _cells(rng, n_trials, users=(60, 90), weights=(0.75, 0.25), shift=None):
    """Trials that differ only by per-user noise (plus ``shift[t]`` on every MAE)."""
    cells = []
    for n, w in zip(users, weights):
        base_mae, base_ndcg = rng.uniform(0.5, 1.0, n), rng.uniform(0.5, 1.0, n)
        mae = base_mae + rng.normal(0, 0.1, (n_trials, n))
        ndcg = base_ndcg + rng.normal(0, 0.1, (n_trials, n))
        if shift is not None:
            mae = mae + np.asarray(shift)[:, None]
        cells.append({"weight": w, "mae": mae, "ndcg": ndcg})
    return cells


def test_cell_objectives_by_hand_skip_undefined_values():
    cells = [
        {"weight": 0.5, "mae": [[1.0, 3.0], [2.0, 2.0]], "ndcg": [[0.5, np.nan], [0.2, 0.4]]},
        {"weight": 0.5, "mae": [[1.0], [0.0]], "ndcg": [[1.0], [0.0]]},
    ]
    got = stats.cell_objectives(cells, ndcg_weight=2.0)
    # trial 0: 0.5 (2 - 2 x 0.5) + 0.5 (1 - 2 x 1); trial 1: 0.5 (2 - 2 x 0.3) + 0.5 (0 - 0)
    np.testing.assert_allclose(got, [0.5 * 1.0 - 0.5, 0.5 * 1.4])
    only_first = stats.cell_objectives(cells, 2.0, [np.array([True, False]), np.array([True])])
    np.testing.assert_allclose(only_first, [0.5 * 0.0 - 0.5, 0.5 * (2.0 - 0.4)])


def test_split_half_finds_a_clearly_better_trial_every_time():
    shift = np.zeros(6)
    shift[3] = -0.5  # far outside the noise of a half's mean
    res = stats.split_half_selection(_cells(np.random.default_rng(0), 6, shift=shift), n_splits=50)
    assert res["win_share"][3] == 1.0 and res["same_winner"] == 1.0 and res["regret"] == 0.0
    assert abs(res["optimism"]) < 0.02


def test_split_half_between_equal_trials_shows_the_winners_curse():
    # every trial has the same expected objective: the half-A winner looks better on A than it
    # does on the users it did not see, and the halves rarely agree on a winner
    res = stats.split_half_selection(_cells(np.random.default_rng(1), 12), n_splits=300)
    assert res["optimism"] > 0.01 and res["regret"] > 0.01
    assert res["winner_in_sample"] < min(res["held_out"])
    assert res["same_winner"] < 0.5 and max(res["win_share"]) < 0.9


def test_paired_objective_ci_of_a_constant_shift_is_that_shift():
    cells = _cells(np.random.default_rng(2), 2)
    for c in cells:
        c["mae"] = np.stack([c["mae"][0], c["mae"][0] + 0.2])
        c["ndcg"] = np.stack([c["ndcg"][0], c["ndcg"][0]])
    res = stats.paired_objective_ci(cells, 0, 1, n_boot=200)
    assert res["diff"] == pytest.approx(-0.2)
    np.testing.assert_allclose(res["ci95"], [-0.2, -0.2], atol=1e-12)
    same = stats.paired_objective_ci(cells, 1, 1, n_boot=200)
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0]


def test_pool_seeds_keys_units_by_seed_and_user():
    got = stats.pool_seeds(
        [(0, {"user": [1, 2], "mae": [0.5, None]}), (2, {"user": [1], "mae": [1.0]})], ("mae",)
    )
    assert got == {"unit": ["0:1", "0:2", "2:1"], "mae": [0.5, None, 1.0]}
