"""Tests of users -> federated clients (metarec.data.partition): every user in exactly one client,
near-equal IID sizes, seeded determinism, feature-homogeneous non-IID clients whose feature
distributions differ from the population's."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from metarec.data import partition as mpart

OCCUPATIONS = ["student", "engineer", "writer", "artist", "doctor"]


def users_frame(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user_id": np.arange(1, n + 1) * 3,  # non-contiguous ids
            # skewed group sizes, like MovieLens' occupations
            "occupation": rng.choice(OCCUPATIONS, n, p=[0.5, 0.2, 0.15, 0.1, 0.05]),
            "age": rng.integers(-1, 70, n),
            "gender": rng.choice(["M", "F"], n),
        }
    )


def covers_exactly_once(parts, users):
    allu = np.concatenate(parts)
    assert allu.size == len(users) and set(allu.tolist()) == set(np.asarray(users).tolist())


def test_iid_partition_covers_every_user_once_with_near_equal_sizes():
    users = users_frame().user_id.to_numpy()
    parts = mpart.iid_partition(users, 7, seed=3)
    covers_exactly_once(parts, users)
    sizes = [p.size for p in parts]
    assert len(parts) == 7 and max(sizes) - min(sizes) <= 1
    again = mpart.iid_partition(users[::-1], 7, seed=3)  # input order does not matter
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = mpart.iid_partition(users, 7, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    s = mpart.sizes(parts)
    assert s["clients"] == 7 and s["users"] == 200 and s["max"] - s["min"] <= 1


def test_feature_partition_is_homogeneous_bounded_and_covers_once():
    frame = users_frame()
    users = frame.user_id.to_numpy()
    groups = mpart.user_groups(frame, users, ("occupation",))
    parts = mpart.feature_partition(users, groups, max_size=12, seed=0)
    covers_exactly_once(parts, users)
    label = dict(zip(users.tolist(), groups.tolist()))
    for p in parts:
        assert p.size <= 12 and len({label[int(u)] for u in p}) == 1
    # each group cut into ceil(n_group / 12) near-equal clients
    for g in OCCUPATIONS:
        n_g = int((groups == g).sum())
        mine = [p for p in parts if label[int(p[0])] == g]
        assert len(mine) == -(-n_g // 12)
        assert max(p.size for p in mine) - min(p.size for p in mine) <= 1


def test_non_iid_clients_differ_in_feature_distribution():
    frame = users_frame()
    users = frame.user_id.to_numpy()
    groups = mpart.user_groups(frame, users, ("occupation",))
    label = dict(zip(users.tolist(), groups.tolist()))
    iid = mpart.iid_partition(users, 17, seed=0)
    non = mpart.feature_partition(users, groups, max_size=12, seed=0)
    h_iid, h_non = mpart.heterogeneity(iid, label), mpart.heterogeneity(non, label)
    assert h_non > h_iid + 0.2
    # a non-IID client holds one occupation; IID clients mix them
    assert max(len({label[int(u)] for u in p}) for p in non) == 1
    assert np.mean([len({label[int(u)] for u in p}) for p in iid]) > 2


def test_user_groups_age_buckets_and_combinations():
    frame = pd.DataFrame(
        {
            "user_id": [1, 2, 3, 4, 5],
            "age": [-1, 17, 18, 49, 56],
            "gender": ["M", "F", "M", "F", "M"],
            "occupation": ["a", "b", "a", "b", "a"],
        }
    )
    assert mpart.user_groups(frame, [1, 2, 3, 4, 5], ("age",)).tolist() == [
        "-1",
        "0",
        "1",
        "4",
        "6",
    ]
    assert mpart.user_groups(frame, [5, 2], ("gender", "occupation")).tolist() == ["M|a", "F|b"]


def test_errors():
    frame = users_frame(20)
    users = frame.user_id.to_numpy()
    with pytest.raises(ValueError, match="n_clients must be an int in"):
        mpart.iid_partition(users, 0, seed=0)
    with pytest.raises(ValueError, match="distinct"):
        mpart.iid_partition([1, 1, 2], 1, seed=0)
    with pytest.raises(ValueError, match="allowed: occupation, age, gender"):
        mpart.user_groups(frame, users, ("zip",))
    with pytest.raises(ValueError, match="without features"):
        mpart.user_groups(frame, [999999], ("age",))
    with pytest.raises(ValueError, match="one label per user"):
        mpart.feature_partition(users, ["a"], 4, seed=0)
