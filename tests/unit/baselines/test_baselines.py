"""Tests for metarec.baselines: known answers on synthetic data, fallbacks, padding, determinism."""

import math

import jax
import numpy as np
import pytest

from metarec import metrics as M
from metarec.baselines import BASELINES, lookup, make_baseline, mf_fold_in, prepare_ratings
from metarec.baselines.knn import fit_user_knn, user_knn_similarity

ALL = sorted(BASELINES)
MF_KW = dict(dim=2, reg=0.05, steps=600, lr=0.05)  # shared so the training scan compiles once


def raw_item(i):
    """Arbitrary, non-contiguous raw item ids."""
    return 7 * np.asarray(i) + 1003


def raw_user(u):
    return 11 * np.asarray(u) + 5


def to_tasks(users, items, ratings, n_support, n_query, pad_s=0, pad_q=0, seed=0):
    """Dense per-user triples -> padded [T, S] / [T, Q] arrays (support first, query last)."""
    rng = np.random.default_rng(seed)
    T = len(users)
    S, Q = n_support + pad_s, n_query + pad_q
    si = np.zeros((T, S), np.int64)
    sr = np.zeros((T, S), np.float32)
    sm = np.zeros((T, S), np.float32)
    qi = np.zeros((T, Q), np.int64)
    qr = np.zeros((T, Q), np.float32)
    qm = np.zeros((T, Q), np.float32)
    for t, _u in enumerate(users):
        its, rts = items[t], ratings[t]
        perm = rng.permutation(len(its))[: n_support + n_query]
        s, q = perm[:n_support], perm[n_support:]
        si[t, :n_support], sr[t, :n_support], sm[t, :n_support] = its[s], rts[s], 1
        qi[t, :n_query], qr[t, :n_query], qm[t, :n_query] = its[q], rts[q], 1
    return si, sr, sm, qi, qr, qm


@pytest.fixture(scope="module")
def planted():
    """Ratings from a planted rank-2 biased model, 40 training users, 8 evaluation users."""
    rng = np.random.default_rng(0)
    n_users, n_items, d = 48, 30, 2
    P = rng.normal(size=(n_users, d))
    Qf = rng.normal(size=(n_items, d))
    bu = 0.3 * rng.normal(size=n_users)
    bi = 0.3 * rng.normal(size=n_items)
    R = 3.0 + bu[:, None] + bi[None, :] + 0.6 * P @ Qf.T
    obs = rng.random((n_users, n_items)) < 0.8
    train_u, train_i = np.nonzero(obs[:40])
    train = (raw_user(train_u), raw_item(train_i), R[:40][train_u, train_i].astype(np.float32))
    eval_items = [np.flatnonzero(np.ones(n_items)) for _ in range(8)]
    eval_r = [R[40 + t] for t in range(8)]
    tasks = to_tasks(np.arange(40, 48), [raw_item(x) for x in eval_items], eval_r, 15, 10)
    return train, tasks


def rmse_of(pred, qr, qm):
    return float(M.batch_rmse(pred, qr, qm))


# ------------------------------------------------------------------------- known answers


def test_mf_beats_global_mean_on_planted_low_rank(planted):
    train, (si, sr, sm, qi, qr, qm) = planted
    users = np.arange(si.shape[0])
    g = make_baseline("global_mean")
    pg = g.predict(g.fit(*train), si, sr, sm, qi, qm, users)
    b = make_baseline("mf", **MF_KW, clip=False)
    state = b.fit(*train)
    pm = b.predict(state, si, sr, sm, qi, qm, users)
    loss = np.asarray(state.loss_history)
    assert loss[-1] < 0.05 * loss[0]
    r_g, r_m = rmse_of(pg, qr, qm), rmse_of(pm, qr, qm)
    assert r_m < 0.25 * r_g, (r_m, r_g)
    # and, on the same data, item_mean / user_mean are in between but far worse than mf
    for name in ("user_mean", "item_mean"):
        bb = make_baseline(name)
        r = rmse_of(bb.predict(bb.fit(*train), si, sr, sm, qi, qm, users), qr, qm)
        assert r_m < 0.5 * r


def test_mf_fold_in_recovers_planted_user_exactly():
    rng = np.random.default_rng(3)
    n_items, d, S = 25, 4, 12
    item_bias = rng.normal(size=n_items).astype(np.float32)
    item_factors = rng.normal(size=(n_items, d)).astype(np.float32)
    mu, b_true, p_true = 3.2, -0.4, rng.normal(size=d)
    idx = rng.choice(n_items, S, replace=False)
    rating = mu + item_bias[idx] + b_true + item_factors[idx] @ p_true
    # two padded slots with garbage must be ignored
    idx_p = np.concatenate([idx, [0, 1]])
    rating_p = np.concatenate([rating, [99.0, -99.0]]).astype(np.float32)
    w = np.concatenate([np.ones(S), [0.0, 0.0]]).astype(np.float32)
    b, p = mf_fold_in(item_bias, item_factors, mu, idx_p, rating_p, w, 0.0)
    assert float(b) == pytest.approx(b_true, abs=2e-3)
    np.testing.assert_allclose(np.asarray(p), p_true, atol=2e-3)
    # ridge: compare with the normal equations solved in float64
    lam = 2.0
    X = np.concatenate([np.ones((S, 1)), item_factors[idx]], axis=1).astype(np.float64)
    y = rating - mu - item_bias[idx]
    theta = np.linalg.solve(X.T @ X + lam * np.eye(d + 1), X.T @ y)
    b, p = mf_fold_in(item_bias, item_factors, mu, idx_p, rating_p, w, lam)
    np.testing.assert_allclose(np.concatenate([[float(b)], np.asarray(p)]), theta, atol=1e-4)


def test_mf_fold_in_agrees_with_training_at_the_optimum():
    """Fold-in minimises the training objective's per-user part, so folding in a TRAINING user
    from their training ratings must reproduce the trained (b_u, p_u) once training converged."""
    rng = np.random.default_rng(5)
    n_users, n_items = 12, 10
    u, i = np.nonzero(rng.random((n_users, n_items)) < 0.7)
    r = rng.integers(1, 6, size=len(u)).astype(np.float32)
    reg = 0.5
    b = make_baseline("mf", dim=3, reg=reg, steps=1500, lr=0.05)
    st = b.fit(u, i, r)
    for user in (0, 5):
        sel = u == user
        bu, pu = mf_fold_in(
            st.item_bias,
            st.item_factors,
            st.mu,
            i[sel],
            r[sel],
            np.ones(sel.sum(), np.float32),
            reg,
        )
        assert float(bu) == pytest.approx(float(st.user_bias[user]), abs=2e-3)
        np.testing.assert_allclose(np.asarray(pu), np.asarray(st.user_factors[user]), atol=2e-3)


def test_global_and_user_mean_exact():
    train = (np.array([1, 1, 2]), np.array([10, 20, 10]), np.array([5.0, 3.0, 1.0]))  # mu = 3
    si = np.array([[10, 20, 30, 0], [10, 0, 0, 0], [0, 0, 0, 0]])
    sr = np.array([[4.0, 4.0, 4.0, 0.0], [2.0, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    sm = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    qi = np.array([[10, 999], [20, 10], [10, 20]])
    qm = np.ones((3, 2), np.float32)
    users = np.array([7, 8, 9])
    g = make_baseline("global_mean")
    np.testing.assert_allclose(g.predict(g.fit(*train), si, sr, sm, qi, qm, users), 3.0)
    um = make_baseline("user_mean")
    pred = np.asarray(um.predict(um.fit(*train), si, sr, sm, qi, qm, users))
    # constant user -> exact; empty support -> global mean
    np.testing.assert_allclose(pred, [[4.0, 4.0], [2.0, 2.0], [3.0, 3.0]])
    um2 = make_baseline("user_mean", shrinkage=2.0)
    pred = np.asarray(um2.predict(um2.fit(*train), si, sr, sm, qi, qm, users))
    # (3*4 + 2*3)/(3+2) = 3.6 ; (2 + 2*3)/(1+2) = 8/3
    np.testing.assert_allclose(pred[:, 0], [3.6, 8.0 / 3.0, 3.0], rtol=1e-6)


def test_item_mean_on_item_constant_data():
    items = np.array([10, 10, 10, 20, 20, 30])
    users = np.array([1, 2, 3, 1, 2, 3])
    r = np.array([4.0, 4.0, 4.0, 2.0, 2.0, 5.0])  # item-constant; mu = 21/6 = 3.5
    qi = np.array([[10, 20, 30, 40]])  # 40 never seen in training
    args = (
        np.zeros((1, 1), int),
        np.zeros((1, 1)),
        np.zeros((1, 1)),
        qi,
        np.ones((1, 4)),
        np.array([0]),
    )
    b = make_baseline("item_mean", shrinkage=0.0)
    np.testing.assert_allclose(
        np.asarray(b.predict(b.fit(users, items, r), *args)), [[4.0, 2.0, 5.0, 3.5]]
    )
    b = make_baseline("item_mean", shrinkage=1.0)
    # (3*4 + 3.5)/4, (2*2 + 3.5)/3, (5 + 3.5)/2, unseen -> mu
    np.testing.assert_allclose(
        np.asarray(b.predict(b.fit(users, items, r), *args)),
        [[15.5 / 4, 7.5 / 3, 8.5 / 2, 3.5]],
        rtol=1e-6,
    )


def test_user_knn_hand_made():
    # centred training rows: user 1 [5/3, -7/3, 2/3], user 2 [-7/3, 5/3, 2/3],
    # user 3 [4/3, 1/3, -5/3]; user 4 rated only item 50 (centred 0)
    u = np.array([1, 1, 1, 2, 2, 2, 3, 3, 3, 4])
    i = np.array([10, 20, 30, 10, 20, 30, 10, 20, 30, 50])
    r = np.array([5, 1, 4, 1, 5, 4, 4, 3, 1, 2], np.float32)
    si = np.array([[10, 20, 0]])
    sr = np.array([[4.0, 2.0, 0.0]], np.float32)  # support mean 3, centred [1, -1]
    sm = np.array([[1, 1, 0]], np.float32)
    st = fit_user_knn(u, i, r)
    sim, m = user_knn_similarity(st, si[0], sr[0], sm[0], 0.0)
    s1 = 4.0 / (math.sqrt(2) * math.sqrt(74.0 / 9.0))  # = 12/sqrt(148)
    s3 = 1.0 / (math.sqrt(2) * math.sqrt(17.0 / 9.0))  # = 3/sqrt(34)
    np.testing.assert_allclose(np.asarray(sim), [s1, -s1, s3, 0.0], rtol=1e-5)
    assert float(m) == pytest.approx(3.0)
    sim_s, _ = user_knn_similarity(st, si[0], sr[0], sm[0], 2.0)  # n_common = 2 -> factor 1/2
    np.testing.assert_allclose(np.asarray(sim_s), np.asarray(sim) * 0.5, rtol=1e-5)

    qi = np.array([[30, 50, 999]])  # 50: only a zero-similarity neighbour; 999 unseen
    qm = np.ones((1, 3), np.float32)
    p1 = make_baseline("user_knn", k=1, shrink=0.0).predict(st, si, sr, sm, qi, qm, np.array([0]))
    p2 = make_baseline("user_knn", k=2, shrink=0.0).predict(st, si, sr, sm, qi, qm, np.array([0]))
    # k=1: the nearest neighbour is user 1, deviation on item 30 is 4 - 10/3
    np.testing.assert_allclose(np.asarray(p1), [[3.0 + 2.0 / 3.0, 3.0, 3.0]], rtol=1e-5)
    expected = 3.0 + (s1 * (2.0 / 3.0) + s3 * (-5.0 / 3.0)) / (s1 + s3)
    np.testing.assert_allclose(np.asarray(p2), [[expected, 3.0, 3.0]], rtol=1e-5)


def test_item_knn_hand_made():
    # items a=1, b=2, c=3, d=4, e=5 over users 1..3 (d rated by user 1 only);
    # a, b, c, e have mean 3, d mean 2
    # centred columns: a [2,0,-2], b [1,0,-1], c [-2,0,2], d [0,.,.], e [2,-2,0]
    u = np.array([1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
    i = np.array([1, 2, 3, 4, 5, 1, 2, 3, 5, 1, 2, 3, 5])
    r = np.array([5, 4, 1, 2, 5, 3, 3, 3, 1, 1, 2, 5, 3], np.float32)
    si = np.array([[1, 2, 4, 0]])
    sr = np.array([[5.0, 2.0, 5.0, 0.0]], np.float32)  # support mean 4; deviations a: 2, b: -1
    sm = np.array([[1, 1, 1, 0]], np.float32)
    qi = np.array([[5, 3, 99, 2]])
    qm = np.array([[1, 1, 1, 0]], np.float32)
    b2 = make_baseline("item_knn", k=2, shrink=0.0)
    st = b2.fit(u, i, r)
    p = np.asarray(b2.predict(st, si, sr, sm, qi, qm, np.array([0])))
    # e: sim(e,a) = sim(e,b) = 0.5, sim(e,d) = 0 -> 3 + (0.5*2 + 0.5*(-1)) / 1 = 3.5
    # c: anti-correlated with a, b -> no neighbour -> item mean 3 ; 99 unseen -> support mean 4
    np.testing.assert_allclose(p, [[3.5, 3.0, 4.0, 0.0]], rtol=1e-5)
    # k=1: tie between a and b broken by support order -> a -> 3 + 2 = 5
    b1 = make_baseline("item_knn", k=1, shrink=3.0)
    p = np.asarray(b1.predict(st, si, sr, sm, qi, qm, np.array([0])))
    np.testing.assert_allclose(p[0, :3], [5.0, 3.0, 4.0], rtol=1e-5)


# ------------------------------------------------------------------------- fallbacks, padding


@pytest.mark.parametrize("name", ALL)
def test_padding_and_unseen_items(name, planted):
    train, (si, sr, sm, qi, qr, qm) = planted
    kw = dict(MF_KW) if name == "mf" else {}
    if name in ("user_knn", "item_knn"):
        kw["task_chunk"] = 3  # chunk does not divide T=8 or T=5
    b = make_baseline(name, **kw)
    st = b.fit(*train)
    T = 5
    users = np.arange(T)
    unseen = 424242
    base = np.asarray(b.predict(st, si[:T], sr[:T], sm[:T], qi[:T], qm[:T], users))
    assert base.dtype == np.float32 and base.shape == (T, 10) and np.all(np.isfinite(base))
    # padded support/query slots full of garbage (incl. unseen ids) at the front / back, and the
    # last task turned into an all-padding task (as pad_tasks makes): one extra compiled shape
    si2 = np.concatenate([np.full((T, 3), unseen), si[:T]], 1)
    sr2 = np.concatenate([np.full((T, 3), 77.0), sr[:T]], 1)
    sm2 = np.concatenate([np.zeros((T, 3)), sm[:T]], 1)
    qi2 = np.concatenate([qi[:T], np.full((T, 2), unseen)], 1)
    qm2 = np.concatenate([qm[:T], np.zeros((T, 2))], 1)
    sm2[-1], qm2[-1] = 0.0, 0.0
    pad = np.asarray(b.predict(st, si2, sr2, sm2, qi2, qm2, users))
    np.testing.assert_allclose(pad[:-1, :10], base[:-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(pad[:, 10:], 0.0)
    np.testing.assert_array_equal(pad[-1], 0.0)
    # tasks are independent: reversing the task order reverses the predictions
    rev = np.asarray(
        b.predict(st, si[:T][::-1], sr[:T][::-1], sm[:T][::-1], qi[:T][::-1], qm[:T][::-1], users)
    )
    np.testing.assert_allclose(rev[::-1], base, rtol=1e-5, atol=1e-5)
    # unseen query item -> a finite prediction equal to the documented fallback
    qi3 = qi[:T].copy()
    qi3[:, 0] = unseen
    p3 = np.asarray(b.predict(st, si[:T], sr[:T], sm[:T], qi3, qm[:T], users))
    mu = float(np.mean(train[2]))
    smean = (sr[:T] * sm[:T]).sum(1) / sm[:T].sum(1)
    lo, hi = train[2].min(), train[2].max()
    if name in ("global_mean", "item_mean"):
        np.testing.assert_allclose(p3[:, 0], np.clip(mu, lo, hi), rtol=1e-5)
    elif name in ("user_mean", "user_knn", "item_knn"):
        np.testing.assert_allclose(p3[:, 0], np.clip(smean, lo, hi), rtol=1e-5)
    else:  # mf: mu + b_u, b_u from the fold-in
        idx, known = lookup(st.item_vocab, si[:T])
        fold = jax.jit(
            jax.vmap(
                lambda i, r, w: mf_fold_in(
                    st.item_bias, st.item_factors, st.mu, i, r, w, MF_KW["reg"]
                )[0]
            )
        )
        bu = np.asarray(fold(idx, sr[:T], (sm[:T] * known).astype(np.float32)))
        np.testing.assert_allclose(p3[:, 0], np.clip(float(st.mu) + bu, lo, hi), rtol=1e-4)


def test_mf_seeded_determinism(planted):
    train, _ = planted
    a = make_baseline("mf", **MF_KW, seed=1).fit(*train)
    b = make_baseline("mf", **MF_KW, seed=1).fit(*train)
    c = make_baseline("mf", **MF_KW, seed=2).fit(*train)
    np.testing.assert_array_equal(np.asarray(a.item_factors), np.asarray(b.item_factors))
    assert not np.allclose(np.asarray(a.item_factors), np.asarray(c.item_factors))


def test_registry_and_input_errors():
    with pytest.raises(ValueError, match="valid names: global_mean, user_mean"):
        make_baseline("svd")
    with pytest.raises(ValueError, match="allowed: dim, reg"):
        make_baseline("mf", rank=3)
    with pytest.raises(ValueError, match="shrink"):
        make_baseline("user_knn", shrink=-1.0)
    with pytest.raises(ValueError, match="duplicate rating for user 1 and item 10"):
        prepare_ratings([1, 2, 1], [10, 10, 10], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="equal lengths"):
        prepare_ratings([1, 2], [10], [1.0])
    with pytest.raises(ValueError, match=r"ratings\[1\]"):
        prepare_ratings([1, 2], [10, 10], [1.0, np.nan])
    b = make_baseline("global_mean")
    st = b.fit([1], [2], [3.0])
    with pytest.raises(ValueError, match=r"\[T, Q\]"):
        b.predict(
            st,
            np.zeros((2, 3), int),
            np.zeros((2, 3)),
            np.zeros((2, 3)),
            np.zeros((3, 4), int),
            np.zeros((3, 4)),
            np.zeros(2),
        )
