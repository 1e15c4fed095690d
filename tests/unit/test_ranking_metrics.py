"""Batched full-catalogue ranking metrics (:func:`metarec.metrics.ranking_metrics`)."""

import jax.numpy as jnp
import numpy as np

from metarec import metrics as M


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
