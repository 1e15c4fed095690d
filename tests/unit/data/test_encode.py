"""Feature encoding: vocabularies from training ratings only, out-of-vocabulary ids, unseen
release years, the offset prior, stable shapes across seeds, age buckets."""

from __future__ import annotations

import jax
import numpy as np
import pandas as pd
import pytest

from metarec import data as mdata
from metarec.data.encode import Vocab, age_bucket
from metarec.data.scenarios import make_split, new_items


def test_encoding_vocab_oov_and_offset(scenario_data):
    split = make_split(scenario_data, seed=0)
    enc = mdata.FeatureEncoder.fit(scenario_data, split.train_ratings)
    tasks = enc.encode(split.sets["item_cold"])
    # every item-cold query item is new -> its id is out of vocabulary; its release year (newer
    # than every training year) takes the newest training year's row
    real = tasks.query.mask > 0
    assert np.all(tasks.query.x["item"][..., 1] == 0)
    years = pd.to_numeric(
        scenario_data.items.set_index("item_id").loc[split.train_ratings.item_id.unique(), "year"],
        errors="coerce",
    )
    newest = enc.vocabs["year"].index[str(int(years.max()))]
    assert np.all(tasks.query.x["item"][..., 0][real] == newest)
    oov = mdata.FeatureEncoder.fit(scenario_data, split.train_ratings, unseen_years="oov")
    assert np.all(oov.encode(split.sets["item_cold"]).query.x["item"][..., 0][real] == 0)
    warm = enc.encode(split.sets["warm_train"])
    assert np.all(warm.support.x["item"][..., 1][warm.support.mask > 0] > 0)
    spec = enc.spec
    assert spec.item_vocab[1] == len(scenario_data.items) + 1  # stable across seeds
    assert len(enc.vocabs["item_id"].tokens) == len(set(split.train_ratings.item_id))
    other_split = make_split(scenario_data, seed=1)
    other = mdata.FeatureEncoder.fit(scenario_data, other_split.train_ratings)
    assert other.spec == spec
    tight = mdata.FeatureEncoder.fit(scenario_data, split.train_ratings, stable_shapes=False)
    assert tight.spec.item_vocab[1] == len(set(split.train_ratings.item_id)) + 1
    assert spec.n_genres == 19 and spec.user_vocab[0] == 8
    s = split.sets["warm_train"]
    k, mu = enc.offset_prior, enc.global_mean
    expect = ((s.support_rating * s.support_mask).sum(1) + k * mu) / (s.support_mask.sum(1) + k)
    np.testing.assert_allclose(warm.query.x["offset"][:, 0], expect, rtol=1e-6)
    np.testing.assert_array_equal(warm.support.x["offset"][:, 3], warm.query.x["offset"][:, 7])
    # round trip of the vocabularies
    enc2 = mdata.FeatureEncoder.from_dict(enc.to_dict()).bind(scenario_data)
    t2 = enc2.encode(split.sets["item_cold"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, tasks, t2)


def test_age_buckets():
    ages = np.array([-1, 1, 17, 18, 24, 25, 34, 35, 45, 49, 50, 55, 56, 80])
    np.testing.assert_array_equal(age_bucket(ages), [0, 1, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6, 7, 7])


def test_nearest_year_vocab():
    v = Vocab(["1990", "1994", "unknown"], nearest=True)
    i90, i94, unk = (v.index[t] for t in ("1990", "1994", "unknown"))
    # seen tokens as before; unseen numbers to the nearest seen number, ties to the smaller one
    got = v.encode(["1990", "unknown", "1998", "1980", "1992", "1993", "1991", "V", "nan"])
    np.testing.assert_array_equal(got, [i90, unk, i94, i90, i90, i94, i90, 0, 0])
    plain = Vocab(["1990", "1994"])
    np.testing.assert_array_equal(plain.encode(["1998", "1990"]), [0, plain.index["1990"]])
    assert Vocab(["unknown"], nearest=True).encode(["1998"]).tolist() == [0]


def test_unseen_years_round_trip_and_old_files(scenario_data):
    split = make_split(scenario_data, seed=0)
    new = new_items(scenario_data)
    enc = mdata.FeatureEncoder.fit(scenario_data, split.train_ratings)
    d = enc.to_dict()
    assert d["unseen_years"] == "nearest"
    rows = scenario_data.items["item_id"].isin(new).to_numpy()
    again = mdata.FeatureEncoder.from_dict(d).bind(scenario_data)
    np.testing.assert_array_equal(again._tables[3], enc._tables[3])
    assert np.all(again._tables[3][rows, 0] > 0)
    # a file written before the field existed keeps the encoding it was written with: OOV
    del d["unseen_years"]
    old = mdata.FeatureEncoder.from_dict(d).bind(scenario_data)
    assert np.all(old._tables[3][rows, 0] == 0)
    with pytest.raises(ValueError, match="unseen_years='latest'; allowed: nearest, oov"):
        mdata.FeatureEncoder.fit(scenario_data, split.train_ratings, unseen_years="latest")
