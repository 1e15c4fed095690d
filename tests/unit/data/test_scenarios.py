"""Cold-start scenarios (PROTOCOL.md): membership rules, the protocol's permutation, determinism,
the time protocol."""

from __future__ import annotations

import numpy as np
import pytest

from metarec.data.scenarios import make_split


def test_scenario_rules(scenario_data):
    d = scenario_data
    split = make_split(d, seed=0)
    s = split.sets
    new_items = set(split.new_items.tolist())
    years = d.items.set_index("item_id").year
    assert all(years[i] != "unknown" and int(years[i]) >= 1997 for i in new_items)
    assert 3 not in new_items and 4 not in new_items  # unknown years are existing items
    new_users = set(split.new_users.tolist())
    assert len(new_users) == int(0.2 * len(d.users))
    groups = {k: set(v.user_id.tolist()) for k, v in s.items()}
    # no user is both new and existing; warm_test and warm_train disjoint
    assert not (groups["warm_train"] | groups["warm_test"] | groups["item_cold"]) & new_users
    assert (groups["user_cold"] | groups["user_item_cold"]) <= new_users
    assert not groups["warm_train"] & groups["warm_test"]
    for name, sets in s.items():
        assert sets.query_item.shape[1] == 10
        np.testing.assert_array_equal(sets.query_mask.sum(1), 10)
        n = sets.support_mask.sum(1) + 10
        assert n.min() >= 13 and n.max() <= 100, name
        real = np.concatenate(
            [sets.support_item[sets.support_mask > 0], sets.query_item[sets.query_mask > 0]]
        )
        real_items = set(real.tolist())
        if name in ("warm_train", "warm_test", "user_cold"):
            assert not real_items & new_items, name
        else:
            assert real_items <= new_items, name
        # padding is masked and zero
        assert np.all(sets.support_item[sets.support_mask == 0] == 0)
        assert np.all(sets.support_rating[sets.support_mask == 0] == 0)
    # training ratings: no test users, no new items, no new users
    tr = split.train_ratings
    assert not set(tr.user_id) & (groups["warm_test"] | new_users)
    assert not set(tr.item_id) & new_items


def test_scenario_follows_protocol_permutation(scenario_data):
    d = scenario_data
    split = make_split(d, seed=5)
    sets = split.sets["user_cold"]
    uid = int(sets.user_id[0])
    new_items = set(split.new_items.tolist())
    g = d.ratings[(d.ratings.user_id == uid) & ~d.ratings.item_id.isin(new_items)]
    g = g.sort_values("item_id")
    perm = np.random.default_rng(5 + uid).permutation(len(g))
    order = g.item_id.to_numpy()[perm]
    np.testing.assert_array_equal(sets.query_item[0], order[-10:])
    np.testing.assert_array_equal(sets.support_item[0][sets.support_mask[0] > 0], order[:-10])


def test_scenarios_deterministic_and_seed_dependent(scenario_data):
    a, b, c = (make_split(scenario_data, seed=s) for s in (1, 1, 2))
    for k in a.sets:
        np.testing.assert_array_equal(a.sets[k].query_item, b.sets[k].query_item)
    assert not np.array_equal(a.new_users, c.new_users)


def test_time_protocol(scenario_data):
    split = make_split(scenario_data, seed=0, protocol="time")
    for sets in split.sets.values():
        assert sets.support_item.shape[1] == 15 and sets.query_item.shape[1] == 5
        # support strictly precedes (or ties) the query in time
        assert np.all(sets.support_time.max(1) <= sets.query_time.min(1))
    first = scenario_data.ratings.groupby("user_id").timestamp.min()
    assert first[split.new_users].min() >= first.drop(split.new_users).max()


def test_unknown_protocol(scenario_data):
    with pytest.raises(ValueError, match=r"unknown protocol 'mamo'; allowed: melu, time"):
        make_split(scenario_data, 0, protocol="mamo")


@pytest.mark.parametrize("protocol", ["melu", "time"])
def test_user_sets_ratings_rebuild_the_same_sets(scenario_data, protocol):
    """``UserSets.ratings`` gives back exactly the ratings a set was built from, so the protocol's
    rule builds the same set again from them."""
    from metarec.data.scenarios import protocol_sets

    sets = make_split(scenario_data, seed=3, protocol=protocol).sets["warm_train"]
    frame = sets.ratings()
    assert len(frame) == sets.n_ratings
    assert list(frame.columns) == ["user_id", "item_id", "rating", "timestamp"]
    again = protocol_sets(frame.sample(frac=1.0, random_state=0), protocol, 3)  # order-free
    # warm_train's support width is the whole warm scenario's (warm_test's users included)
    again = again.pad_support(sets.support_item.shape[1])
    for f in ("user_id", "support_item", "support_rating", "support_time", "query_item"):
        np.testing.assert_array_equal(getattr(again, f), getattr(sets, f))
    query = sets.ratings(("query",))
    assert len(query) == int(sets.query_mask.sum())
    first = query[query["user_id"] == sets.user_id[0]]["item_id"].tolist()
    assert first == sets.query_item[0][sets.query_mask[0] > 0].tolist()
