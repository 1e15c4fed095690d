"""Profile injection: the stated number of fake users and ratings, at the extremes, seeded."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from metarec.data.injection import make_injection, poison


def frames(n_users=40, n_items=30, seed=0):
    rng = np.random.default_rng(seed)
    rows = [
        (u, i, float(rng.integers(1, 6)), 880000000 + int(rng.integers(0, 1000)))
        for u in range(1, n_users + 1)
        for i in rng.choice(np.arange(1, n_items + 1), 15, replace=False)
    ]
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).astype(
        {"user_id": "int64", "item_id": "int64", "rating": "float32", "timestamp": "int64"}
    )
    users = pd.DataFrame(
        {
            "user_id": np.arange(1, n_users + 3, dtype=np.int64),  # two users without ratings
            "age": rng.integers(18, 60, n_users + 2),
            "gender": rng.choice(["M", "F"], n_users + 2),
            "occupation": "x",
            "zip_code": "12345",
        }
    )
    return ratings, users


@pytest.mark.parametrize("kind", ["random", "average"])
def test_injection_adds_the_stated_users_at_the_extremes(kind):
    ratings, users = frames()
    inj = make_injection(
        ratings,
        users,
        fraction=0.1,
        n_filler=8,
        n_targets=3,
        kind=kind,
        seed=1,
        min_target_ratings=5,
    )
    assert inj.n_users == 4  # round(0.1 x 40 users with ratings)
    assert inj.n_ratings == 4 * (8 + 3) == len(inj.ratings)
    fake = inj.ratings
    assert fake["user_id"].min() > users["user_id"].max()  # above every real id
    assert sorted(fake["user_id"].unique()) == sorted(inj.users["user_id"])
    assert set(fake["rating"].unique()) <= {1.0, 5.0}
    tgt = fake[fake["item_id"].isin(inj.targets)]
    assert len(tgt) == 4 * 3 and (tgt["rating"] == 5.0).all()
    assert not fake.duplicated(["user_id", "item_id"]).any()
    assert set(fake["item_id"]) <= set(ratings["item_id"])
    if kind == "average":  # fillers at the extreme of their item's side of the midpoint
        mean = ratings.groupby("item_id")["rating"].mean()
        fill = fake[~fake["item_id"].isin(inj.targets)]
        want = np.where(mean.loc[fill["item_id"]].to_numpy() >= 3.0, 5.0, 1.0)
        np.testing.assert_array_equal(fill["rating"].to_numpy(), want)
    r2, u2 = poison(ratings, users, inj)
    assert len(r2) == len(ratings) + inj.n_ratings and len(u2) == len(users) + inj.n_users
    assert (r2.dtypes == ratings.dtypes).all() and (u2.dtypes == users.dtypes).all()
    pd.testing.assert_frame_equal(r2.iloc[: len(ratings)], ratings)


def test_injection_is_seeded():
    ratings, users = frames()
    kw = dict(fraction=0.2, n_filler=5, n_targets=2, min_target_ratings=5)
    a = make_injection(ratings, users, seed=3, **kw)
    b = make_injection(ratings, users, seed=3, **kw)
    c = make_injection(ratings, users, seed=4, **kw)
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    pd.testing.assert_frame_equal(a.users, b.users)
    assert not a.ratings.equals(c.ratings)
    assert a.summary() == {"n_users": 8, "n_ratings": 56, "targets": a.targets.tolist()}


def test_bad_injection_settings_are_refused():
    ratings, users = frames()
    with pytest.raises(ValueError, match="fraction"):
        make_injection(ratings, users, fraction=0.0)
    with pytest.raises(ValueError, match="kind"):
        make_injection(ratings, users, fraction=0.1, kind="bandwagon")
    with pytest.raises(ValueError, match="targets"):
        make_injection(ratings, users, fraction=0.1, n_targets=3, min_target_ratings=10**6)
