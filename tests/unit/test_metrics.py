"""Tests for metarec.metrics: hand-computed values, masking, ties, jit/vmap, properties."""

import itertools
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metarec import metrics as M

L3 = math.log2(3.0)  # log2(rank + 1) for rank 2


def f(x):
    return float(np.asarray(x))


# ---------------------------------------------------------------- hand-computed values


def test_mae_rmse_hand_computed():
    pred = [1.0, 2.0, 3.0, 9.0]
    true = [2.0, 2.0, 5.0, 0.0]
    mask = [1, 1, 1, 0]
    # |1-2| + |2-2| + |3-5| = 3 over 3 real entries
    assert f(M.mae(pred, true, mask)) == pytest.approx(1.0)
    # sqrt((1 + 0 + 4) / 3)
    assert f(M.rmse(pred, true, mask)) == pytest.approx(math.sqrt(5.0 / 3.0), rel=1e-6)
    assert f(M.mae(pred, true, [0, 0, 0, 0])) == 0.0


def test_ndcg_perfect_and_reversed():
    true = [3.0, 2.0, 1.0]
    ones = [1, 1, 1]
    v, ok = M.ndcg_at_k([3.0, 2.0, 1.0], true, ones, 3)
    assert f(v) == pytest.approx(1.0) and f(ok) == 1.0
    # reversed: ranks 1,2,3 get gains 1, 3, 7:  DCG = 1 + 3/log2(3) + 7/2
    # ideal: 7 + 3/log2(3) + 1/2
    v, ok = M.ndcg_at_k([1.0, 2.0, 3.0], true, ones, 3)
    assert f(v) == pytest.approx((1 + 3 / L3 + 3.5) / (7 + 3 / L3 + 0.5), rel=1e-6)
    assert f(v) == pytest.approx(0.680606, abs=1e-6)


def test_ndcg_ties_use_stable_query_order():
    # all scores tie -> ranking is the given order 0,1,2; k=2 -> gains 1 and 7
    true = [1.0, 3.0, 2.0]
    v, _ = M.ndcg_at_k([0.0, 0.0, 0.0], true, [1, 1, 1], 2)
    expected = (1.0 + 7.0 / L3) / (7.0 + 3.0 / L3)
    assert f(v) == pytest.approx(expected, rel=1e-6)
    assert f(v) == pytest.approx(0.609089, abs=1e-6)
    # tie between items 1 and 2 only: order 0 (score 5), then 1 before 2
    v2, _ = M.ndcg_at_k([5.0, 1.0, 1.0], [1.0, 2.0, 3.0], [1, 1, 1], 2)
    assert f(v2) == pytest.approx((1.0 + 3.0 / L3) / (7.0 + 3.0 / L3), rel=1e-6)


def test_ndcg_no_positive_gain_is_invalid_and_excluded():
    v, ok = M.ndcg_at_k([1.0, 2.0], [0.0, 0.0], [1, 1], 3)
    assert f(v) == 0.0 and f(ok) == 0.0
    pred = jnp.array([[1.0, 2.0], [2.0, 1.0]])
    true = jnp.array([[0.0, 0.0], [1.0, 2.0]])
    # task 0 is excluded -> the batch mean is task 1's nDCG (reversed, k=2)
    expected = (1.0 + 3.0 / L3) / (3.0 + 1.0 / L3)
    assert f(M.batch_ndcg_at_k(pred, true, jnp.ones((2, 2)), k=2)) == pytest.approx(expected, 1e-6)


def test_expected_random_ndcg_closed_form_and_enumeration():
    true = np.array([3.0, 2.0, 1.0])
    # mean gain (7+3+1)/3 over ranks 1,2:  E[DCG@2] = 11/3 * (1 + 1/log2 3); IDCG@2 = 7 + 3/log2 3
    expected = (11.0 / 3.0) * (1 + 1 / L3) / (7 + 3 / L3)
    v, ok = M.expected_random_ndcg_at_k(true, [1, 1, 1], 2)
    assert f(v) == pytest.approx(expected, rel=1e-6) and f(ok) == 1.0
    assert f(v) == pytest.approx(0.672463, abs=1e-6)
    # exact check by enumerating all orders of 4 real items (+ 2 padded entries)
    true = np.array([5.0, 1.0, 0.0, 4.0, 5.0, 3.0])
    mask = np.array([1, 1, 1, 0, 1, 0])
    real = np.flatnonzero(mask)
    vals = []
    for perm in itertools.permutations(range(len(real))):
        pred = np.zeros(6)
        pred[real] = -np.asarray(perm, float)  # perm[i] = rank of real item i
        vals.append(f(M.ndcg_at_k(pred, true, mask, 3)[0]))
    v, _ = M.expected_random_ndcg_at_k(true, mask, 3)
    assert f(v) == pytest.approx(np.mean(vals), rel=1e-5)


def test_precision_recall_f1_auc_hand_computed():
    pred = [0.9, 0.8, 0.7, 0.1]
    true = [5.0, 3.0, 4.0, 4.0]
    m = [1, 1, 1, 1]
    # top-2 = items 0 (relevant) and 1 (not) ; 3 relevant in all
    p, pv = M.precision_at_k(pred, true, m, 2)
    r, rv = M.query_recall_at_k(pred, true, m, 2)
    f1, fv = M.f1_at_k(pred, true, m, 2)
    assert (
        f(p) == pytest.approx(0.5) and f(r) == pytest.approx(1 / 3) and f(f1) == pytest.approx(0.4)
    )
    assert f(pv) == f(rv) == f(fv) == 1.0
    # relevant {0.9, 0.7, 0.1} vs non-relevant {0.8}: only 0.9 > 0.8 -> 1/3
    a, av = M.auc(pred, true, m)
    assert f(a) == pytest.approx(1 / 3) and f(av) == 1.0
    # ties count 1/2
    assert f(M.auc([0.5, 0.5], [5.0, 1.0], [1, 1])[0]) == pytest.approx(0.5)
    # threshold argument: with threshold 5 only item 0 is relevant
    assert f(M.auc(pred, true, m, threshold=5.0)[0]) == pytest.approx(1.0)
    # no non-relevant -> invalid; k larger than the real entries -> precision over n_real
    assert f(M.auc(pred, [5.0, 5.0, 4.0, 4.0], m)[1]) == 0.0
    p, _ = M.precision_at_k([0.9, 0.8, 7.0], [5.0, 1.0, 5.0], [1, 1, 0], 5)
    assert f(p) == pytest.approx(0.5)
    assert f(M.query_recall_at_k(pred, [1.0, 1.0, 1.0, 1.0], m, 2)[1]) == 0.0


def test_summarize_and_seeds():
    assert f(M.summarize([1.0, 2.0, np.nan], [1.0, 3.0, 0.0])) == pytest.approx(7.0 / 4.0)
    assert np.isnan(f(M.summarize([1.0], [0.0])))
    assert f(M.summarize([1.0, 3.0])) == pytest.approx(2.0)
    out = M.mean_std_over_seeds([1.0, 2.0, 3.0])
    assert out == {"mean": 2.0, "std": 1.0}  # sample std (ddof=1)
    assert M.mean_std_over_seeds([0.7]) == {"mean": 0.7, "std": 0.0}
    with pytest.raises(ValueError):
        M.mean_std_over_seeds([])


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\[Q\]"):
        M.mae(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="ties"):
        M.hit_rate_at_k(jnp.ones(3), 0, None, 1, ties="random")


# ---------------------------------------------------------------- full catalogue


def test_catalogue_metrics_hand_computed():
    scores = jnp.array([0.1, 0.9, 0.5, 0.7, 0.3])
    excl = jnp.array([False, True, False, False, False])
    # candidates sorted: item3 (0.7), item2 (0.5), item4, item0 -> target 2 at 0-based rank 1
    assert f(M.hit_rate_at_k(scores, 2, excl, k=1)) == 0.0
    assert f(M.hit_rate_at_k(scores, 2, excl, k=2)) == 1.0
    assert f(M.ndcg_at_k_single_target(scores, 2, excl, k=2)) == pytest.approx(1 / L3)
    assert f(M.ndcg_at_k_single_target(scores, 3, excl, k=2)) == pytest.approx(1.0)
    # without the exclusion the target falls to rank 2
    assert f(M.hit_rate_at_k(scores, 2, None, k=2)) == 0.0
    # an excluded target is still a candidate
    assert f(M.hit_rate_at_k(scores, 1, excl, k=1)) == 1.0
    # recall with two targets (int with -1 padding, and bool mask): top-2 = {3, 2} -> 1/2
    r, ok = M.recall_at_k(scores, jnp.array([2, 4, -1]), excl, k=2)
    assert f(r) == pytest.approx(0.5) and f(ok) == 1.0
    r2, _ = M.recall_at_k(scores, jnp.array([False, False, True, False, True]), excl, k=2)
    assert f(r2) == pytest.approx(0.5)
    assert f(M.recall_at_k(scores, jnp.array([-1, -1]), excl, k=2)[1]) == 0.0
    # single target: recall == hit rate
    assert f(M.recall_at_k(scores, jnp.array([2]), excl, k=2)[0]) == 1.0


def test_catalogue_ties():
    s = jnp.ones(3)
    assert f(M.hit_rate_at_k(s, 0, None, k=1)) == 1.0  # stable: lowest index first
    assert f(M.hit_rate_at_k(s, 2, None, k=1)) == 0.0
    assert f(M.hit_rate_at_k(s, 0, None, k=1, ties="pessimistic")) == 0.0
    assert f(M.hit_rate_at_k(s, 0, None, k=3, ties="pessimistic")) == 1.0
    # pessimistic: item 2 is behind both equal-score candidates but ahead of nobody else
    s2 = jnp.array([2.0, 1.0, 1.0, 0.0])
    assert f(M.ndcg_at_k_single_target(s2, 2, None, k=3, ties="pessimistic")) == pytest.approx(0.5)
    assert f(M.ndcg_at_k_single_target(s2, 2, None, k=3)) == pytest.approx(0.5)
    assert f(M.ndcg_at_k_single_target(s2, 1, None, k=3)) == pytest.approx(1 / L3)
    r, _ = M.recall_at_k(s, jnp.array([0, 1]), None, k=1, ties="pessimistic")
    assert f(r) == 0.0


# ---------------------------------------------------------------- masking / jit / vmap


def _random_batch(rng, t=5, q=7):
    pred = rng.normal(size=(t, q)).astype(np.float32)
    true = rng.integers(1, 6, size=(t, q)).astype(np.float32)
    mask = (rng.random((t, q)) < 0.8).astype(np.float32)
    mask[:, 0] = 1.0
    return pred, true, mask


def test_padding_never_changes_any_metric():
    rng = np.random.default_rng(0)
    pred, true, mask = _random_batch(rng)
    vals, ok = M.per_task_metrics(pred, true, mask, k=3)
    for _ in range(3):
        # garbage in the padded slots, and extra padded slots inserted at random positions
        p2 = np.where(mask > 0, pred, rng.normal(size=pred.shape) * 100)
        t2 = np.where(mask > 0, true, rng.integers(0, 6, size=true.shape))
        extra = 4
        q = pred.shape[1]
        # real slots at random (sorted, so the relative order and stable ties are kept) positions
        slots = np.sort(rng.choice(q + extra, size=q, replace=False))
        P = np.full((pred.shape[0], q + extra), 1e6, np.float32)  # padding: huge scores,
        T = np.full_like(P, 5.0)  # top ratings
        Mk = np.zeros_like(P)  # but masked
        P[:, slots], T[:, slots], Mk[:, slots] = p2, t2, mask
        vals2, ok2 = M.per_task_metrics(P, T, Mk, k=3)
        for key in vals:
            np.testing.assert_allclose(vals[key], vals2[key], rtol=1e-6, err_msg=key)
            np.testing.assert_array_equal(ok[key], ok2[key], err_msg=key)


def test_jit_equals_nojit_and_vmap_equals_loop():
    rng = np.random.default_rng(1)
    pred, true, mask = _random_batch(rng)
    vals, ok = M.per_task_metrics(pred, true, mask, k=3)  # jitted + vmapped
    # eager, one task at a time
    fns = {
        "mae": lambda p, t, m: (M.mae(p, t, m), 1.0),
        "rmse": lambda p, t, m: (M.rmse(p, t, m), 1.0),
        "ndcg@3": lambda p, t, m: M.ndcg_at_k(p, t, m, 3),
        "random_ndcg@3": lambda p, t, m: M.expected_random_ndcg_at_k(t, m, 3),
        "precision@3": lambda p, t, m: M.precision_at_k(p, t, m, 3),
        "recall@3": lambda p, t, m: M.query_recall_at_k(p, t, m, 3),
        "f1@3": lambda p, t, m: M.f1_at_k(p, t, m, 3),
        "auc": lambda p, t, m: M.auc(p, t, m),
    }
    assert set(fns) == set(vals)
    for key, fn in fns.items():
        loop = [fn(pred[i], true[i], mask[i]) for i in range(pred.shape[0])]
        np.testing.assert_allclose(vals[key], [f(v) for v, _ in loop], rtol=1e-6, err_msg=key)
        np.testing.assert_array_equal(ok[key], [f(o) for _, o in loop], err_msg=key)
    # a single metric: jit == eager
    v_j = jax.jit(M.ndcg_at_k, static_argnums=3)(pred[0], true[0], mask[0], 3)
    v_e = M.ndcg_at_k(pred[0], true[0], mask[0], 3)
    assert f(v_j[0]) == pytest.approx(f(v_e[0]), rel=1e-6)
    # batched wrapper with a padded task of weight 0 == mean of the real ones
    w = np.array([1, 1, 1, 1, 0], np.float32)
    got = M.batch_rmse(pred, true, mask, weights=w)
    assert f(got) == pytest.approx(float(np.mean(vals["rmse"][:4])), rel=1e-6)
    got_j = jax.jit(lambda *a: M.batch_ndcg_at_k(*a, k=3))(pred, true, mask, w)
    assert f(got_j) == pytest.approx(float(np.mean(vals["ndcg@3"][:4])), rel=1e-6)
    # catalogue metrics under vmap + jit (traced targets)
    scores = rng.normal(size=(4, 20)).astype(np.float32)
    targets = np.array([0, 5, 19, 7])
    excl = rng.random((4, 20)) < 0.3
    hr = jax.jit(jax.vmap(lambda s, t, e: M.hit_rate_at_k(s, t, e, k=5)))(scores, targets, excl)
    hr_loop = [M.hit_rate_at_k(scores[i], targets[i], excl[i], k=5) for i in range(4)]
    np.testing.assert_array_equal(hr, np.array(hr_loop))


# ---------------------------------------------------------------- properties

ratings = hnp.arrays(np.float32, 6, elements=st.integers(0, 5).map(float))
scores_ = hnp.arrays(np.float32, 6, elements=st.floats(-3, 3, width=32))
masks = hnp.arrays(np.float32, 6, elements=st.sampled_from([0.0, 1.0]))


@settings(max_examples=40, deadline=None)
@given(scores_, ratings, masks, st.integers(1, 7))
def test_ndcg_in_unit_interval_and_perfect_is_one(pred, true, mask, k):
    v, ok = M.ndcg_at_k(pred, true, mask, k)
    assert -1e-6 <= f(v) <= 1 + 1e-6
    vp, okp = M.ndcg_at_k(true, true, mask, k)
    if f(okp):
        assert f(vp) == pytest.approx(1.0, abs=1e-6)
    rv, _ = M.expected_random_ndcg_at_k(true, mask, k)
    assert -1e-6 <= f(rv) <= 1 + 1e-6


@settings(max_examples=40, deadline=None)
@given(ratings, masks)
def test_auc_perfect_is_one_reversed_is_zero(true, mask):
    a, ok = M.auc(true, true, mask)
    ar, okr = M.auc(-true, true, mask)
    if f(ok):
        assert f(a) == pytest.approx(1.0) and f(ar) == pytest.approx(0.0)
    else:
        assert f(a) == 0.0 and f(okr) == 0.0


# ---------------------------------------------------------------- batched catalogue ranking
def test_ranking_metrics_hand_computed():
    scores = jnp.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    rel = jnp.array([[0, 1, 0, 1], [0, 0, 0, 0]], bool)
    m = M.ranking_metrics(scores, rel, k=2)
    # row 0: top-2 = items 0, 1 -> hit at rank 2; 2 relevant, min(k, 2) = 2
    np.testing.assert_allclose(m["hr@2"], [1, 0])
    np.testing.assert_allclose(m["recall@2"], [0.5, 0])
    np.testing.assert_allclose(m["ndcg@2"], [(1 / np.log2(3)) / (1 + 1 / np.log2(3)), 0], rtol=1e-6)
    np.testing.assert_allclose(m["acc"], [0, 0])


def test_ranking_metrics_agree_with_the_single_row_metrics():
    """With one target, hr@k and ndcg@k equal hit_rate_at_k and ndcg_at_k_single_target (ties by
    item index in both)."""
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=(6, 12)), 1).astype(np.float32)  # with ties
    target = rng.integers(0, 12, 6)
    rel = np.eye(12, dtype=bool)[target]
    m = M.ranking_metrics(jnp.asarray(scores), jnp.asarray(rel), k=3)
    for r in range(6):
        assert float(m["hr@3"][r]) == float(M.hit_rate_at_k(scores[r], target[r], k=3))
        want = float(M.ndcg_at_k_single_target(scores[r], target[r], k=3))
        np.testing.assert_allclose(float(m["ndcg@3"][r]), want, rtol=1e-6)


def test_ranking_metrics_rank_by_rank_scores_and_errors_use_pred():
    # raw scores 6.0 > 5.5 > 1.0 clip to 5, 5, 1: clipping ties the first two items, and the stable
    # tie order (query order) then ranks the worse item first
    true = np.array([[3.0, 5.0, 1.0]], np.float32)
    raw = np.array([[5.5, 6.0, 1.0]], np.float32)
    clipped = np.clip(raw, 1, 5)
    mask = np.ones_like(true)
    vals_clip, _ = M.per_task_metrics(clipped, true, mask, k=1)
    vals_raw, _ = M.per_task_metrics(clipped, true, mask, k=1, rank_scores=raw)
    assert float(vals_clip["ndcg@1"][0]) == pytest.approx((2**3 - 1) / (2**5 - 1))
    assert float(vals_raw["ndcg@1"][0]) == pytest.approx(1.0)
    # the error metrics are those of the clipped predictions either way: |5-3|, |5-5|, |1-1|
    for vals in (vals_clip, vals_raw):
        assert float(vals["mae"][0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="rank_scores"):
        M.per_task_metrics(clipped, true, mask, k=1, rank_scores=raw[:, :2])
