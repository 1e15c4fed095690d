"""Tasks drawn from every training rating: sizes, disjointness, seeding, held-out query ratings."""

import numpy as np
import pandas as pd
import pytest

from metarec import data as mdata


def _frame(counts, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u, n in counts.items():
        items = rng.choice(np.arange(1, 500), size=n, replace=False)
        for i in items:
            rows.append((u, int(i), float(rng.integers(1, 6)), int(rng.integers(0, 10**6))))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


def test_every_user_makes_one_task_with_the_protocol_sizes():
    counts = {1: 250, 2: 100, 3: 13, 4: 6, 5: 4, 6: 3}
    f = _frame(counts)
    pool = mdata.rating_pool(f, min_ratings=4)
    assert pool.user_id.tolist() == [1, 2, 3, 4, 5]  # user 6 (3 ratings) makes no task
    assert pool.n_ratings == 250 + 100 + 13 + 6 + 4
    s = mdata.sample_user_sets(pool, np.random.default_rng(0), max_ratings=100, n_query=10)
    assert s.support_item.shape == (5, 90) and s.query_item.shape == (5, 10)
    n_sup, n_qry = s.support_mask.sum(1).tolist(), s.query_mask.sum(1).tolist()
    # heavy rater subsampled to 100; light raters keep min_support=3 support ratings
    assert n_qry == [10, 10, 10, 3, 1] and n_sup == [90, 90, 3, 3, 3]
    by_user = {u: g for u, g in f.groupby("user_id")}
    for t, u in enumerate(s.user_id):
        sup = s.support_item[t][s.support_mask[t] > 0]
        qry = s.query_item[t][s.query_mask[t] > 0]
        assert not set(sup) & set(qry)  # disjoint
        g = by_user[u].set_index("item_id")["rating"]
        assert set(sup) | set(qry) <= set(g.index)  # only the user's own ratings
        np.testing.assert_array_equal(s.support_rating[t][s.support_mask[t] > 0], g[sup].values)
        np.testing.assert_array_equal(s.query_rating[t][s.query_mask[t] > 0], g[qry].values)


def test_draws_are_seeded_and_differ_between_epochs():
    pool = mdata.rating_pool(_frame({1: 150, 2: 40}))

    def draw(epoch):
        return mdata.sample_user_sets(pool, np.random.default_rng([7, epoch]))

    a, b, c = draw(1), draw(1), draw(2)
    np.testing.assert_array_equal(a.query_item, b.query_item)
    assert not np.array_equal(a.query_item, c.query_item)
    # the frame's row order does not matter
    shuffled = mdata.rating_pool(_frame({1: 150, 2: 40}).sample(frac=1.0, random_state=3))
    d = mdata.sample_user_sets(shuffled, np.random.default_rng([7, 1]))
    np.testing.assert_array_equal(a.query_item, d.query_item)
    # over many epochs a heavy rater's every rating is drawn
    seen = set()
    for e in range(40):
        s = draw(e)
        seen |= set(s.support_item[0][s.support_mask[0] > 0]) | set(s.query_item[0])
    assert len(seen) == 150


def test_bad_sizes_are_refused():
    pool = mdata.rating_pool(_frame({1: 20}))
    with pytest.raises(ValueError, match="max_ratings >= n_query \\+ min_support"):
        mdata.sample_user_sets(pool, np.random.default_rng(0), max_ratings=10, n_query=10)


def test_drop_query_ratings_removes_exactly_the_held_out_pairs():
    f = _frame({1: 30, 2: 30, 3: 30})
    pool = mdata.rating_pool(f)
    sets = mdata.sample_user_sets(pool, np.random.default_rng(0), max_ratings=20, n_query=5)
    sets = sets.select(np.array([True, False, True]))
    kept = mdata.drop_query_ratings(f, sets)
    assert len(kept) == len(f) - 10
    held = {(u, i) for t, u in enumerate(sets.user_id) for i in sets.query_item[t]}
    assert not held & set(zip(kept["user_id"], kept["item_id"]))


def test_held_out_query_sets_stay_fixed_and_out_of_the_supports():
    f = _frame({1: 150, 2: 30, 3: 8})
    pool = mdata.rating_pool(f)
    held = mdata.hold_out_queries(pool, np.random.default_rng(5), n_query=10, min_support=3)
    assert held.sum() == 10 + 10 + 5

    def draw(epoch):
        return mdata.sample_user_sets(pool, np.random.default_rng([1, epoch]), fixed_query=held)

    a, b = draw(1), draw(2)
    for t in range(3):
        qa = set(a.query_item[t][a.query_mask[t] > 0])
        assert qa == set(b.query_item[t][b.query_mask[t] > 0])  # the same query every epoch
        for s in (a, b):
            assert not qa & set(s.support_item[t][s.support_mask[t] > 0])
    # the heavy rater's support is a fresh subsample of its other 140 ratings
    assert a.support_mask[0].sum() == 90
    assert set(a.support_item[0]) != set(b.support_item[0])
    # the item tables' ratings: everything but the held-out ones
    rest = mdata.drop_held_out(f, pool, held)
    assert len(rest) == len(f) - held.sum()
    held_pairs = {(u, i) for t, u in enumerate(a.user_id) for i in a.query_item[t] if i}
    assert not held_pairs & set(zip(rest["user_id"], rest["item_id"]))


def _time_ranks(f: pd.DataFrame) -> dict:
    """(user, item) -> the rating's position in its user's history by time (ties: item id)."""
    g = f.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    g = g.assign(rank=g.groupby("user_id").cumcount())
    return {(u, i): r for u, i, r in zip(g["user_id"], g["item_id"], g["rank"])}


def _ranks(sets, t, prefix, ranks) -> list:
    m = getattr(sets, f"{prefix}_mask")[t] > 0
    return [ranks[(int(sets.user_id[t]), int(i))] for i in getattr(sets, f"{prefix}_item")[t][m]]


@pytest.mark.parametrize("held_out", [False, True])
def test_chronological_tasks_query_the_ratings_right_after_their_support(held_out):
    """Chronological tasks are shaped as the time protocol's: the query a run of consecutive
    ratings in time with at least min_support before it, the support the ratings right before it
    (at most max_ratings - n_query), in time order; a held-out window is the same every epoch."""
    f = _frame({1: 150, 2: 30, 3: 8, 4: 4})
    pool, ranks = mdata.rating_pool(f), _time_ranks(f)
    held = None
    if held_out:
        held = mdata.hold_out_queries(
            pool, np.random.default_rng(5), n_query=5, min_support=3, chronological=True
        )
        assert held.sum() == 5 + 5 + 5 + 1

    def draw(epoch):
        return mdata.sample_user_sets(
            pool,
            np.random.default_rng([1, epoch]),
            max_ratings=20,
            n_query=5,
            fixed_query=held,
            chronological=True,
        )

    firsts = set()
    for epoch in (1, 2, 3):
        s = draw(epoch)
        for t, n in enumerate((150, 30, 8, 4)):
            sup, qry = _ranks(s, t, "support", ranks), _ranks(s, t, "query", ranks)
            n_q = min(5, n - 3)
            assert qry == list(range(qry[0], qry[0] + n_q)) and qry[0] >= 3
            assert sup == list(range(max(0, qry[0] - 15), qry[0]))  # right before, in order
            if t == 0:
                firsts.add(qry[0])
    # a held-out window stays; a drawn one moves (the heavy rater's over 143 places)
    assert (len(firsts) == 1) == held_out
    if held_out:  # the held-out ratings are exactly the query sets
        a = draw(1)
        rest = mdata.drop_held_out(f, pool, held)
        q = {(int(u), int(i)) for t, u in enumerate(a.user_id) for i in a.query_item[t] if i}
        assert len(q) == held.sum() and not q & set(zip(rest["user_id"], rest["item_id"]))
    # random held-out sets are refused: a chronological query must be one run in time
    scattered = mdata.hold_out_queries(pool, np.random.default_rng(0), n_query=5, min_support=3)
    with pytest.raises(ValueError, match="consecutive ratings in time"):
        mdata.sample_user_sets(
            pool,
            np.random.default_rng(0),
            max_ratings=20,
            n_query=5,
            fixed_query=scattered,
            chronological=True,
        )


def _sets(support, query, width=6, q_width=4):
    """UserSets of users 10, 11, ... from lists of (item, rating) pairs."""
    n = len(support)
    a = mdata.scenarios.padded_arrays(np.arange(10, 10 + n), width, q_width)
    for u, (s, q) in enumerate(zip(support, query)):
        for prefix, pairs in (("support", s), ("query", q)):
            for j, (i, r) in enumerate(pairs):
                a[f"{prefix}_item"][u, j] = i
                a[f"{prefix}_rating"][u, j] = r
                a[f"{prefix}_mask"][u, j] = 1.0
                a[f"{prefix}_time"][u, j] = 100 * u + j
    return mdata.UserSets(**a)


def test_hold_out_items_is_a_seeded_fraction_of_the_rated_items():
    f = _frame({1: 50, 2: 80})
    items = np.unique(f["item_id"])
    a = mdata.hold_out_items(f, 0.1, np.random.default_rng(3))
    assert len(a) == round(0.1 * len(items)) and set(a) <= set(items)
    np.testing.assert_array_equal(a, np.sort(a))
    np.testing.assert_array_equal(a, mdata.hold_out_items(f, 0.1, np.random.default_rng(3)))
    assert not np.array_equal(a, mdata.hold_out_items(f, 0.1, np.random.default_rng(4)))
    with pytest.raises(ValueError, match="fraction"):
        mdata.hold_out_items(f, 1.0, np.random.default_rng(0))


def test_hold_out_items_newest_by_release_year_ties_at_random():
    f = pd.DataFrame({"user_id": 1, "item_id": np.arange(1, 11), "rating": 3.0})
    years = pd.Series(
        ["1990", "1996", "1996", "1996", "unknown", "1995", "1980", "1996", "x", "1"],
        index=np.arange(1, 11),
    )
    got = [
        mdata.hold_out_items(f, 0.3, np.random.default_rng(s), newest_by=years) for s in range(8)
    ]
    assert all(len(g) == 3 and set(g) <= {2, 3, 4, 8} for g in got)  # three of the four 1996s
    assert len({tuple(g) for g in got}) > 1  # the tie is broken by the generator
    np.testing.assert_array_equal(
        got[0], mdata.hold_out_items(f, 0.3, np.random.default_rng(0), newest_by=years)
    )
    # unknown and non-numeric years count as the oldest
    assert set(mdata.hold_out_items(f, 0.7, np.random.default_rng(0), newest_by=years)) == {
        1,
        2,
        3,
        4,
        6,
        7,
        8,
    }


def test_hold_out_items_whole_years_never_splits_a_year():
    f = pd.DataFrame({"user_id": 1, "item_id": np.arange(1, 13), "rating": 3.0})
    years = pd.Series(
        ["1996", "1996", "1996", "1995", "1995", "1994", "1990", "1990", "1990", "x", "", "1980"],
        index=np.arange(1, 13),
    )

    def held(fraction, seed=0):
        got = mdata.hold_out_items(
            f, fraction, np.random.default_rng(seed), newest_by=years, whole_years=True
        )
        return set(got.tolist())

    # the newest year even when it alone is more than the fraction (3 of 12 items > 0.1)
    assert held(0.1) == {1, 2, 3} == held(0.1, seed=5)  # no random tie-break
    assert held(5 / 12) == {1, 2, 3, 4, 5}  # the next year fits exactly
    assert held(0.5) == {1, 2, 3, 4, 5, 6}  # 1990 would make 9 > 6
    # non-numeric years are the oldest; the oldest numeric year always stays known
    assert held(0.99) == set(range(1, 10))
    with pytest.raises(ValueError, match="newest_by"):
        mdata.hold_out_items(f, 0.1, np.random.default_rng(0), whole_years=True)
    with pytest.raises(ValueError, match="two numeric years"):
        flat = pd.Series("1996", index=np.arange(1, 13))
        mdata.hold_out_items(f, 0.1, np.random.default_rng(0), newest_by=flat, whole_years=True)


def test_split_new_items_scores_new_items_after_adapting_on_known_ones():
    sets = _sets(
        support=[
            [(1, 5.0), (7, 1.0), (2, 4.0), (8, 2.0)],  # user 10: two new items in support
            [(1, 3.0), (2, 3.0)],  # user 11: no new item at all
            [(7, 4.0), (8, 4.0)],  # user 12: only new items in support
        ],
        query=[[(3, 3.0), (9, 5.0)], [(3, 2.0)], [(9, 1.0), (1, 2.0)]],
    )
    known, new = mdata.split_new_items(sets, [7, 8, 9], n_query=4, min_query=3)
    # user 12 has no known support left: dropped from both
    assert known.user_id.tolist() == [10, 11] and new.user_id.tolist() == [10]
    np.testing.assert_array_equal(known.support_item[0], [1, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(known.support_rating[0], [5.0, 4.0, 0, 0, 0, 0])
    np.testing.assert_array_equal(known.support_time[0], [0, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(known.query_item[0], [3, 0, 0, 0])
    np.testing.assert_array_equal(known.support_item[1], [1, 2, 0, 0, 0, 0])  # unchanged
    # user 10's new-item ratings (support first, then query) are its query set
    np.testing.assert_array_equal(new.support_item[0], known.support_item[0])
    np.testing.assert_array_equal(new.query_item[0], [7, 8, 9, 0])
    np.testing.assert_array_equal(new.query_rating[0], [1.0, 2.0, 5.0, 0])
    np.testing.assert_array_equal(new.query_mask[0], [1, 1, 1, 0])
    # fewer new-item ratings than min_query: not scored on new items
    _, new2 = mdata.split_new_items(sets, [7, 8, 9], n_query=4, min_query=4)
    assert new2.n_users == 0
    # the query width caps the new-item ratings kept
    _, new3 = mdata.split_new_items(sets, [7, 8, 9], n_query=2, min_query=2)
    np.testing.assert_array_equal(new3.query_item[0], [7, 8])
