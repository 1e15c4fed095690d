"""Feature encoding: vocabularies from training ratings only, out-of-vocabulary ids, the offset
prior, stable shapes across seeds, age buckets."""

from __future__ import annotations

import jax
import numpy as np

from metarec import data as mdata
from metarec.data.encode import age_bucket
from metarec.data.scenarios import make_split


def test_encoding_vocab_oov_and_offset(scenario_data):
    split = make_split(scenario_data, seed=0)
    enc = mdata.FeatureEncoder.fit(scenario_data, split.train_ratings)
    tasks = enc.encode(split.sets["item_cold"])
    # every item-cold query item is new -> item id and year are out of vocabulary
    assert np.all(tasks.query.x["item"][..., 1] == 0)
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
