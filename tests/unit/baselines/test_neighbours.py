"""Neighbourhood features: equal to the kNN baselines' predictions on query targets, leave-one-out
on support targets, and the task's own user never its own neighbour."""

import numpy as np
import pytest

from metarec.baselines import make_baseline
from metarec.baselines.neighbours import (
    fit_neighbours,
    mf_features,
    neighbour_features,
    new_item_features,
)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(3)
    n_users, n_items = 30, 25
    obs = rng.random((n_users, n_items)) < 0.6
    R = np.clip(np.round(3 + rng.normal(size=(n_users, 1)) + rng.normal(size=(1, n_items))), 1, 5)
    u, i = np.nonzero(obs)
    train = (100 + u, 500 + i, R[u, i].astype(np.float32))
    # 4 new users (ids not among the fitted users): support of 6 items, query of 4
    T, S, Q = 4, 6, 4
    si = np.stack([500 + rng.permutation(n_items)[: S + Q] for _ in range(T)])
    ratings = rng.integers(1, 6, size=si.shape).astype(np.float32)
    sm = np.ones((T, S), np.float32)
    sm[0, -2:] = 0.0  # padding
    return train, si[:, :S], ratings[:, :S], sm, si[:, S:], np.arange(T) + 900


def test_query_targets_equal_the_baselines(world):
    train, si, sr, sm, qi, users = world
    st = fit_neighbours(*train)
    feats = neighbour_features(st, si, sr, sm, qi, users)
    qm = np.ones(qi.shape, np.float32)
    for j, name in enumerate(("user_knn", "item_knn")):
        b = make_baseline(name, clip=False)
        pred = np.asarray(b.predict(b.fit(*train), si, sr, sm, qi, qm, users))
        np.testing.assert_allclose(feats[..., j], pred, atol=1e-5)
    # not vacuous: the two neighbourhoods disagree and vary across targets
    assert np.abs(feats[..., 0] - feats[..., 1]).max() > 0.05
    assert feats[..., 1].std() > 0.05


def test_support_targets_leave_their_own_rating_out(world):
    train, si, sr, sm, _, users = world
    st = fit_neighbours(*train)
    feats = neighbour_features(st, si, sr, sm, si, users)
    for t in range(si.shape[0]):
        for s in np.flatnonzero(sm[t]):
            m = sm[t : t + 1].copy()
            m[0, s] = 0.0
            one = neighbour_features(
                st, si[t : t + 1], sr[t : t + 1], m, si[t : t + 1, s : s + 1], users[t : t + 1]
            )
            # item-kNN: exactly the support without that entry; user-kNN: the same, up to the
            # support mean its similarities centre by (the full support's)
            np.testing.assert_allclose(feats[t, s, 1], one[0, 0, 1], atol=1e-5)
            assert np.isfinite(feats[t, s, 0])
    # changing a support rating leaves that entry's own item-kNN feature unchanged
    sr2 = sr.copy()
    sr2[1, 2] += 2.0
    f2 = neighbour_features(st, si, sr2, sm, si, users)
    np.testing.assert_allclose(f2[1, 2, 1], feats[1, 2, 1], atol=1e-6)
    assert not np.allclose(f2[1, :, 1], feats[1, :, 1])  # but the others' do change


def test_new_items_fall_back_to_the_support_mean(world):
    train, si, sr, sm, _, users = world
    st = fit_neighbours(*train)
    new = np.full((si.shape[0], 1), 10**6)  # an item id no fitted rating has
    feats = neighbour_features(st, si, sr, sm, new, users)
    mean = (sr * sm).sum(1) / sm.sum(1)
    np.testing.assert_allclose(feats[:, 0, 0], mean, atol=1e-5)
    np.testing.assert_allclose(feats[:, 0, 1], mean, atol=1e-5)


def test_unfitted_support_items_count_in_the_base_as_in_the_baselines(world):
    """A support of items no fitted rating has (item_cold's tasks: only new items) or of some:
    query targets still get exactly the baselines' predictions (user-kNN's base is the mean of
    every support rating, not only of the fitted items')."""
    train, si, sr, sm, qi, users = world
    st = fit_neighbours(*train)
    qm = np.ones(qi.shape, np.float32)
    for n_new in (2, si.shape[1]):
        si2 = si.copy()
        si2[:, :n_new] = 10**6 + np.arange(n_new)  # unfitted ids
        feats = neighbour_features(st, si2, sr, sm, qi, users)
        for j, name in enumerate(("user_knn", "item_knn")):
            b = make_baseline(name, clip=False)
            pred = np.asarray(b.predict(b.fit(*train), si2, sr, sm, qi, qm, users))
            np.testing.assert_allclose(feats[..., j], pred, atol=1e-5)
    # all unfitted: no neighbour anywhere, so the user-kNN feature is the support mean
    mean = (sr * sm).sum(1) / sm.sum(1)
    np.testing.assert_allclose(feats[..., 0], np.repeat(mean[:, None], qi.shape[1], 1), atol=1e-5)


def test_own_user_is_not_a_neighbour(world):
    (tu, ti, tr), si, sr, sm, _, _ = world
    # a fitted user's own ratings as support: without the exclusion its own row (similarity 1)
    # would be the top neighbour for every support target
    user = 100
    items, ratings = ti[tu == user][:8], tr[tu == user][:8]
    si1, sr1, sm1 = items[None], ratings[None], np.ones((1, len(items)), np.float32)
    own = neighbour_features(fit_neighbours(tu, ti, tr), si1, sr1, sm1, si1, np.array([user]))
    keep = tu != user
    rest = fit_neighbours(tu[keep], ti[keep], tr[keep])
    without = neighbour_features(rest, si1, sr1, sm1, si1, np.array([user]))
    # the other users' rows are identical in both fits except their centring; user-kNN of the
    # fit with the user equals the fit without it
    np.testing.assert_allclose(own[..., 0], without[..., 0], atol=1e-5)


def test_mf_feature_is_the_mf_baselines_fold_in_leave_one_out(world):
    """Query targets: the mf baseline's unclipped prediction. Support targets: the baseline's
    prediction from the support with that entry masked out. Unfitted items: mu + b_u."""
    train, si, sr, sm, qi, users = world
    b = make_baseline("mf", seed=0, clip=False, steps=200)
    st = b.fit(*train)
    reg = 5.0  # the baseline's default fold-in ridge
    q = mf_features(st, reg, si, sr, sm, qi)
    pred = np.asarray(b.predict(st, si, sr, sm, qi, np.ones(qi.shape, np.float32), users))
    np.testing.assert_allclose(q, pred, atol=1e-4)
    assert q.std() > 0.05  # not vacuous
    s_feat = mf_features(st, reg, si, sr, sm, si)
    for t in range(si.shape[0]):
        for s in np.flatnonzero(sm[t]):
            m = sm[t : t + 1].copy()
            m[0, s] = 0.0
            one = b.predict(st, si[t : t + 1], sr[t : t + 1], m, si[t : t + 1, s : s + 1],
                            np.ones((1, 1), np.float32), users[t : t + 1])  # fmt: skip
            np.testing.assert_allclose(s_feat[t, s], np.asarray(one)[0, 0], atol=1e-4)
    # a support entry's feature does not move with its own rating
    sr2 = sr.copy()
    sr2[1, 2] += 2.0
    assert mf_features(st, reg, si, sr2, sm, si)[1, 2] == pytest.approx(s_feat[1, 2], abs=1e-5)
    # an item outside the fitted vocabulary: the folded-in mu + b_u (the query's first target)
    new = qi.copy()
    new[:, 0] = 99_999
    f_new = mf_features(st, reg, si, sr, sm, new)
    with_new = np.asarray(b.predict(st, si, sr, sm, new, np.ones(qi.shape, np.float32), users))
    np.testing.assert_allclose(f_new[:, 0], with_new[:, 0], atol=1e-4)
    with pytest.raises(ValueError, match="reg > 0"):
        mf_features(st, 0.0, si, sr, sm, qi)


def test_new_item_features_are_the_features_of_the_item_renamed_unseen(world):
    """Every target's as-new features equal what neighbour_features and mf_features give once its
    item (the target and its own support entry) is renamed to an id no fitted rating has."""
    train, si, sr, sm, qi, users = world
    st = fit_neighbours(*train)
    b = make_baseline("mf", seed=0, clip=False, steps=200)
    mf = (b.fit(*train), 5.0)

    def features(s_item, t_item, rows=slice(None)):
        f = neighbour_features(st, s_item, sr[rows], sm[rows], t_item, users[rows])
        m = mf_features(*mf, s_item, sr[rows], sm[rows], t_item)
        return np.concatenate([f, m[..., None]], axis=-1)

    new_q = new_item_features(st, si, sr, sm, qi, mf)
    assert new_q.shape == qi.shape + (3,)
    fresh = 10**6 + np.arange(qi.size).reshape(qi.shape)  # unseen ids, none in a support
    np.testing.assert_allclose(new_q, features(si, fresh), atol=1e-4)
    # without mf: the two kNN columns only
    np.testing.assert_allclose(new_item_features(st, si, sr, sm, qi), new_q[..., :2], atol=1e-6)
    new_s = new_item_features(st, si, sr, sm, si, mf)
    for t in range(si.shape[0]):
        for s in np.flatnonzero(sm[t]):
            renamed = si[t : t + 1].copy()
            renamed[0, s] = 10**7
            one = features(renamed, renamed[:, s : s + 1], slice(t, t + 1))
            np.testing.assert_allclose(new_s[t, s], one[0, 0], atol=1e-4)
    # not vacuous: a fitted item's real features differ from its as-new ones
    assert np.abs(features(si, qi) - new_q).max() > 0.1
    # an item really unfitted: as-new equals the real features
    np.testing.assert_allclose(
        new_item_features(st, si, sr, sm, fresh, mf), features(si, fresh), atol=1e-4
    )


def test_content_features_against_hand_computed_values():
    from metarec.baselines.neighbours import content_features

    # one user: support items 10 (Action, 5), 11 (Action+Comedy, 3), 12 (Comedy, 1), 13 (padding)
    gs = np.array([[[1, 0], [1, 1], [0, 1], [1, 0]]], np.float32)
    sr = np.array([[5, 3, 1, 4]], np.float32)
    sm = np.array([[1, 1, 1, 0]], np.float32)
    si = np.array([[10, 11, 12, 13]])
    # targets: support item 10 itself, a new Action item, a new item without genres
    gt = np.array([[[1, 0], [1, 0], [0, 0]]], np.float32)
    ti = np.array([[10, 99, 98]])
    got = content_features(gs, sr, sm, si, gt, ti, np.full((1, 3), 3.5), shrink=2.0)
    c = 1 / np.sqrt(2)  # cos(Action, Action+Comedy)
    want = [
        2 + c * (3 - 2) / (c + 2),  # leave-one-out: mean 2 of items 11, 12
        3 + (1 * 2 + c * 0 + 0 * -2) / (1 + c + 2),  # mean 3; padding ignored
        3.0,  # no genres: the support mean
    ]
    np.testing.assert_allclose(got[0], want, rtol=1e-6)
    # nothing else in the support: the fallback
    one = content_features(gs[:, :1], sr[:, :1], sm[:, :1], si[:, :1], gt[:, :1], ti[:, :1],
                           np.full((1, 1), 3.5))  # fmt: skip
    np.testing.assert_allclose(one, [[3.5]])
    # task blocks: many tasks equal each task alone
    rng = np.random.default_rng(0)
    T, S, R, G = 300, 7, 5, 4
    gs = (rng.random((T, S, G)) < 0.4).astype(np.float32)
    gt = (rng.random((T, R, G)) < 0.4).astype(np.float32)
    sr = rng.integers(1, 6, (T, S)).astype(np.float32)
    sm = (rng.random((T, S)) < 0.8).astype(np.float32)
    si, ti = rng.integers(0, 9, (T, S)), rng.integers(0, 9, (T, R))
    fb = rng.random((T, R))
    many = content_features(gs, sr, sm, si, gt, ti, fb)
    alone = [content_features(gs[t:t + 1], sr[t:t + 1], sm[t:t + 1], si[t:t + 1], gt[t:t + 1],
                              ti[t:t + 1], fb[t:t + 1])[0] for t in range(0, T, 37)]  # fmt: skip
    np.testing.assert_allclose(many[::37], alone, rtol=1e-6)
    with pytest.raises(ValueError, match="shrink > 0"):
        content_features(gs, sr, sm, si, gt, ti, shrink=0.0)


def test_with_neighbours_content_replaces_only_the_new_item_knn_column(world):
    from metarec.baselines.neighbours import content_features, with_neighbours
    from metarec.data.tasks import Examples, Task

    train, si, sr, sm, qi, users = world
    st = fit_neighbours(*train)
    rng = np.random.default_rng(1)

    def ex(items, y, m):
        g = (rng.random(items.shape + (3,)) < 0.5).astype(np.float32)
        return Examples(x={"genres": g}, y=y, mask=m)

    qm = np.ones(qi.shape, np.float32)
    task = Task(support=ex(si, sr, sm), query=ex(qi, qm, qm), user=users)

    class Sets:
        support_item, support_rating, support_mask, query_item, user_id = si, sr, sm, qi, users

    plain = with_neighbours(task, Sets, st, new_items=True)
    content = with_neighbours(task, Sets, st, new_items=True, content=True)
    for part in ("support", "query"):
        a, b = getattr(plain, part).x, getattr(content, part).x
        np.testing.assert_array_equal(a["nbr"], b["nbr"])
        np.testing.assert_array_equal(a["nbr_new"][..., 0], b["nbr_new"][..., 0])
        items = si if part == "support" else qi
        g = getattr(task, part).x["genres"]
        want = content_features(
            task.support.x["genres"], sr, sm, si, g, items, a["nbr_new"][..., 1]
        )
        np.testing.assert_allclose(b["nbr_new"][..., 1], want, rtol=1e-6)
        assert np.abs(b["nbr_new"][..., 1] - a["nbr_new"][..., 1]).max() > 0.05  # not vacuous
    with pytest.raises(ValueError, match="need new_items=True"):
        with_neighbours(task, Sets, st, content=True)
