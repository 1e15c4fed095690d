"""Simulators: biased MF fit (the baselines' trainer), fold-in of held-out users, the MovieLens
builder on a tiny fixture, and the synthetic latent-user simulator with planted best items."""

import jax
import numpy as np
import pandas as pd
import pytest

from metarec.rl import env as E
from metarec.rl import simulator as S


def _lowrank_frame(n_users=30, n_items=20, rank=2, seed=0, density=1.0):
    rng = np.random.default_rng(seed)
    p, q = rng.normal(size=(n_users, rank)), rng.normal(size=(n_items, rank))
    bu, bi = 0.3 * rng.normal(size=n_users), 0.3 * rng.normal(size=n_items)
    r = 3.0 + bu[:, None] + bi[None] + 0.5 * p @ q.T
    uu, ii = np.meshgrid(np.arange(n_users), np.arange(n_items), indexing="ij")
    keep = rng.uniform(size=r.shape) < density
    return pd.DataFrame(
        {"user_id": uu[keep] + 1, "item_id": ii[keep] + 1, "rating": r[keep].astype(np.float32)}
    )


def test_biased_mf_fits_planted_low_rank_ratings():
    df = _lowrank_frame()
    m = S.fit_biased_mf(df, rank=2, l2=0.0, steps=600, lr=0.05)
    assert m.train_rmse < 0.05
    with pytest.raises(ValueError, match="rating"):
        S.fit_biased_mf(df.drop(columns=["rating"]))


def test_fold_in_recovers_user_parameters_with_items_frozen():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(12, 3)).astype(np.float32)
    bi = rng.normal(size=12).astype(np.float32)
    m = S.MFModel(
        mu=3.0,
        user_bias=np.zeros(1),
        item_bias=bi,
        user_factors=np.zeros((1, 3)),
        item_factors=q,
        user_index={},
        item_index={i: i for i in range(12)},
        train_rmse=0.0,
    )
    b_true, p_true = np.array([0.4, -0.2]), rng.normal(size=(2, 3))
    rows = np.tile(np.arange(12), (2, 1))
    r = 3.0 + b_true[:, None] + bi[None] + p_true @ q.T
    mask = np.ones((2, 12))
    mask[1, 8:] = 0  # padding must be ignored
    r[1, 8:] = 99.0
    b, p = S.fold_in(m, rows, r, mask, l2=1e-6)
    np.testing.assert_allclose(b, b_true, atol=1e-3)
    np.testing.assert_allclose(p, p_true, atol=1e-3)


def _fixture():
    train = _lowrank_frame(n_users=25, n_items=15, density=0.7, seed=2)
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, 16),
            "genres": [("A",) if i % 2 else ("B", "C") for i in range(15)],
        }
    )
    rng = np.random.default_rng(3)
    test_items = rng.integers(1, 18, size=(4, 6))  # ids 16, 17 unknown to the MF
    test_ratings = rng.integers(1, 6, size=(4, 6)).astype(np.float32)
    test_mask = np.ones((4, 6), np.float32)
    test_mask[0, 4:] = 0
    return train, items, test_items, test_ratings, test_mask


def test_movielens_simulator_builds_held_out_users_by_fold_in_only():
    train, items, ti, tr, tm = _fixture()
    cfg = E.EnvConfig(horizon=5, history_len=3)
    sim = S.movielens_simulator(
        train,
        items,
        ("A", "B", "C"),
        ti,
        tr,
        tm,
        env_config=cfg,
        n_items=8,
        mf_steps=50,
        max_train_users=20,
    )
    counts = train.groupby("item_id").size()
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
    np.testing.assert_array_equal(sim.item_ids, [k for k, _ in top])
    assert sim.train.affinity.shape == (20, 8) and sim.test.affinity.shape == (4, 8)
    assert sim.agent_item_factors.shape[0] == 8 and sim.popularity.shape == (8,)
    assert sim.report["test_ratings_unknown_item"] == int((tm * (ti > 15)).sum())
    # changing held-out ratings changes only the held-out users' simulators
    sim2 = S.movielens_simulator(
        train,
        items,
        ("A", "B", "C"),
        ti,
        6.0 - tr,
        tm,
        env_config=cfg,
        n_items=8,
        mf_steps=50,
        max_train_users=20,
    )
    np.testing.assert_allclose(sim.train.affinity, sim2.train.affinity)
    assert not np.allclose(sim.test.affinity, sim2.test.affinity)
    g = np.asarray(sim.train.item_genres[0])
    np.testing.assert_allclose(g.sum(-1), 1.0)
    rated = S.movielens_simulator(
        train,
        items,
        ("A", "B", "C"),
        ti,
        tr,
        tm,
        env_config=cfg,
        n_items=8,
        mf_steps=50,
        reward="rating",
    )
    cr = np.asarray(rated.test.click_reward)
    assert (cr >= 0.2).all() and (cr <= 1.0).all()
    with pytest.raises(ValueError, match="reward"):
        S.movielens_simulator(train, items, ("A",), ti, tr, tm, reward="stars")
    with pytest.raises(ValueError, match="n_items"):
        S.movielens_simulator(train, items, ("A",), ti, tr, tm, n_items=100, mf_steps=5)


def test_synthetic_planted_items_are_each_clusters_best():
    aff, g, labels = S.synthetic_affinity(
        0, 40, 20, n_clusters=4, planted_best=2, planted_boost=3.0
    )
    assert aff.shape == (40, 20) and g.shape == (20, 6)
    top2 = np.argsort(-aff, 1)[:, :2]
    for c in range(4):
        users = np.flatnonzero(labels == c)
        if len(users) > 1:  # all users of a cluster share their best items
            assert all(set(top2[u]) == set(top2[users[0]]) for u in users)
    # different clusters have different best items
    firsts = {
        tuple(sorted(top2[np.flatnonzero(labels == c)[0]])) for c in range(4) if (labels == c).any()
    }
    assert len(firsts) == len({c for c in labels})
    # train / test users are disjoint draws
    a2, _, _ = S.synthetic_affinity(0, 5, 20, first_user=40, n_clusters=4, planted_best=2)
    assert not np.allclose(a2, aff[:5])


def test_simulator_mf_is_the_baselines_trainer_with_per_rating_l2():
    from metarec.baselines.mf import train_mf

    df = _lowrank_frame(n_users=6, n_items=5, density=0.8)
    m = S.fit_biased_mf(df, rank=2, l2=0.1, steps=30, seed=3)
    u = df["user_id"].map(m.user_index).to_numpy()
    i = df["item_id"].map(m.item_index).to_numpy()
    shared = dict(dim=2, reg=0.1, lr=0.05, init_scale=0.1, key=jax.random.key(3))
    ratings = df["rating"].to_numpy()
    mu = float(np.mean(df["rating"].to_numpy(np.float64)))
    p, _, _ = train_mf(u, i, ratings, 6, 5, steps=30, l2_form="rated", mu=mu, **shared)
    np.testing.assert_array_equal(m.item_factors, p["item_factors"])
    np.testing.assert_array_equal(m.user_bias, p["user_bias"])
    with pytest.raises(ValueError, match="l2_form must be one of sum, rated"):
        train_mf(u, i, ratings, 6, 5, steps=1, l2_form="mean", **shared)
