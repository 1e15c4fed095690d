"""Readers, cleaning, scenarios, encoding and task batches — on fixture files written here."""

from __future__ import annotations

import hashlib
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarec import data as mdata
from metarec.data import fetch, readers
from metarec.data.movielens import clean
from metarec.data.scenarios import make_split
from tests.conftest import write_ml100k


def load(directory):
    return clean(readers.read_any(directory), "ml-100k")


# ---------------------------------------------------------------- readers
def test_read_ml100k_fixture(ml100k_dir):
    d = load(ml100k_dir)
    assert len(d.users) == 60 and len(d.items) == 80
    assert d.report["items_unknown_year"] == 2  # item 3 ('V') and item 4 (empty)
    assert set(d.items.loc[d.items.item_id.isin([3, 4]), "year"]) == {"unknown"}
    assert d.items.loc[d.items.item_id == 5, "year"].item() == "1995"
    assert d.items.loc[d.items.item_id == 1, "title"].item().startswith("Movie Ã© 1")  # latin-1 kept
    assert d.genres == readers.ML100K_GENRES
    assert d.ratings.dtypes["rating"] == np.float32
    assert d.report["ratings_kept"] == d.report["ratings_read"] == len(d.ratings)
    # occupation 'none' is a real ml-100k category, not a missing value
    assert "none" in set(d.users.occupation)


def test_read_ml1m_separators_and_latin1(tmp_path):
    directory = tmp_path / "ml-1m"
    directory.mkdir()
    (directory / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n")
    (directory / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Cité des enfants perdus, La (1995)::Adventure|Sci-Fi\n"
        "3::Some Film::Drama\n".encode("latin-1")
    )
    (directory / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::978302109\n2::1::4::978301968\n3::3::2::978300000\n")
    d = clean(readers.read_any(str(directory)), "ml-1m")
    assert d.format == "grouplens-1m"
    assert list(d.items.year) == ["1995", "1995", "unknown"]
    assert d.items.title.iloc[1] == "Cité des enfants perdus, La"
    assert d.items.genres.iloc[1] == ("Adventure", "Sci-Fi")
    assert list(d.users.occupation) == ["K-12 student", "self-employed", "scientist"]
    assert list(d.users.age) == [1, 56, 25]
    assert len(d.ratings) == 4


def test_read_recbole_atomic(tmp_path):
    directory = tmp_path / "rb"
    directory.mkdir()
    (directory / "toy.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t4\t5\n2\t10\t2\t6\n")
    (directory / "toy.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n")
    (directory / "toy.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n10\tToy Story\t1995\tAnimation Comedy\n")
    d = clean(readers.read_any(str(directory)), "toy")
    assert d.format == "recbole"
    assert d.items.genres.iloc[0] == ("Animation", "Comedy")
    assert d.ratings.rating.tolist() == [4.0, 2.0]


def test_recbole_header_without_types_is_an_error(tmp_path):
    (tmp_path / "x.inter").write_text("user_id\titem_id\trating\n1\t2\t3\n")
    with pytest.raises(readers.DataFormatError, match=r"x\.inter, line 1, field 'user_id'.*typed headers"):
        readers.read_recbole(str(tmp_path))


def test_recbole_missing_column_is_an_error(tmp_path):
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\n1\t2\n")
    (tmp_path / "x.user").write_text("user_id:token\n1\n")
    (tmp_path / "x.item").write_text("item_id:token\n2\n")
    with pytest.raises(readers.DataFormatError, match=r"missing column for 'rating'"):
        readers.read_recbole(str(tmp_path))


# ---------------------------------------------------------------- bad input
def test_wrong_delimiter_names_file_and_line(tmp_path):
    d = write_ml100k(tmp_path / "a")
    with open(os.path.join(d, "u.data"), "w") as f:
        f.write("1,2,3,881250949\n")
    with pytest.raises(readers.DataFormatError, match=r"u\.data, line 1: expected 4 fields .*delimiter"):
        load(d)


def test_extra_column_names_line(tmp_path):
    d = write_ml100k(tmp_path / "a", extra_ratings=["1\t2\t3\t881250949\t7"])
    with pytest.raises(readers.DataFormatError, match=r"u\.data, line \d+: expected 4 fields"):
        load(d)


def test_unparseable_rating_is_fatal_with_line_and_field(tmp_path):
    d = write_ml100k(tmp_path / "a", extra_ratings=["1\t2\tfour\t881250949"])
    n_lines = sum(1 for _ in open(os.path.join(d, "u.data")))
    with pytest.raises(readers.DataFormatError, match=rf"u\.data, line {n_lines}, field 'rating': expected a number, got 'four'"):
        load(d)


def test_cleaning_counts(tmp_path):
    extra = [
        "1\t1\t9\t881250949",  # out of scale
        "999\t1\t3\t881250949",  # unknown user
        "1\t999\t3\t881250949",  # unknown item
        "2\t70\t1\t100",  # duplicate pair: older ...
        "2\t70\t5\t999999999",  # ... and newer -> kept
    ]
    d = load(write_ml100k(tmp_path / "a", extra_ratings=extra, seed=3))
    r = d.report
    assert r["ratings_out_of_scale"] == 1
    assert r["ratings_unknown_user"] == 1
    assert r["ratings_unknown_item"] == 1
    assert r["ratings_duplicate"] >= 1
    row = d.ratings[(d.ratings.user_id == 2) & (d.ratings.item_id == 70)]
    assert len(row) == 1 and row.rating.item() == 5.0 and row.timestamp.item() == 999999999
    assert r["ratings_kept"] == r["ratings_read"] - 3 - r["ratings_duplicate"]


def test_missing_file_and_unknown_layout(tmp_path):
    with pytest.raises(readers.DataFormatError, match="data directory not found"):
        readers.read_any(str(tmp_path / "nope"))
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(readers.DataFormatError, match="no MovieLens files found"):
        readers.read_any(str(tmp_path))
    with pytest.raises(readers.DataFormatError, match=r"u\.data: file not found"):
        readers.read_grouplens_100k(str(tmp_path))


# ---------------------------------------------------------------- scenarios
@pytest.fixture
def scenario_data(tmp_path):
    return load(write_ml100k(tmp_path / "s", n_users=120, n_items=150, min_per_user=5, max_per_user=110, seed=7))


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
        real_items = set(np.concatenate([sets.support_item[sets.support_mask > 0], sets.query_item[sets.query_mask > 0]]).tolist())
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
    g = d.ratings[(d.ratings.user_id == uid) & ~d.ratings.item_id.isin(new_items)].sort_values("item_id")
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
    with pytest.raises(ValueError, match=r"unknown protocol 'mamo'; valid: \['melu', 'time'\]"):
        make_split(scenario_data, 0, protocol="mamo")


# ---------------------------------------------------------------- encoding + tasks
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
    other = mdata.FeatureEncoder.fit(scenario_data, make_split(scenario_data, seed=1).train_ratings)
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
    from metarec.data.encode import age_bucket

    np.testing.assert_array_equal(age_bucket(np.array([-1, 1, 17, 18, 24, 25, 34, 35, 45, 49, 50, 55, 56, 80])),
                                  [0, 1, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6, 7, 7])  # fmt: skip


def test_task_batch_through_jit_and_vmap(scenario_data):
    split = make_split(scenario_data, seed=0)
    enc = mdata.FeatureEncoder.fit(scenario_data, split.train_ratings)
    tasks = mdata.tasks.to_device(enc.encode(split.sets["warm_train"]))
    same = jax.jit(lambda t: t)(tasks)
    jax.tree_util.tree_map(np.testing.assert_array_equal, tasks, same)

    def masked_mean(task):
        return jnp.sum(task.support.y * task.support.mask) / jnp.sum(task.support.mask)

    by_vmap = jax.jit(jax.vmap(masked_mean))(tasks)
    by_loop = [masked_mean(mdata.index_tasks(tasks, i)) for i in range(tasks.num_tasks)]
    np.testing.assert_allclose(by_vmap, by_loop, rtol=1e-6)


def test_pad_and_meta_batches():
    task, _, _ = mdata.make_synthetic_tasks(seed=0, n_users=10, n_items=40, n_support=5, n_query=3)
    padded, w = mdata.pad_tasks(task, 4)
    assert padded.num_tasks == 12 and w.tolist() == [1.0] * 10 + [0.0] * 2
    assert padded.support.mask[10:].sum() == 0 and np.all(padded.user[10:] == -1)
    batches = list(mdata.iterate_meta_batches(task, 4, np.random.default_rng(0)))
    assert len(batches) == 2 and all(b.num_tasks == 4 for b in batches)
    seen = np.concatenate([b.user for b in batches])
    assert len(set(seen.tolist())) == 8
    again = list(mdata.iterate_meta_batches(task, 4, np.random.default_rng(0)))
    np.testing.assert_array_equal(seen, np.concatenate([b.user for b in again]))
    with pytest.raises(ValueError, match="larger than the number of training tasks"):
        list(mdata.iterate_meta_batches(task, 11, np.random.default_rng(0)))


def test_synthetic_ground_truth():
    task, spec, truth = mdata.make_synthetic_tasks(seed=1, n_users=50, n_items=60, noise=0.0, scale=0.5, user_bias_std=0.1)
    items = task.support.x["item"][..., 1] - 1
    users = np.repeat(np.arange(50)[:, None], items.shape[1], 1)
    expect = np.clip(truth.true_mean(users, items), 1, 5)
    np.testing.assert_allclose(task.support.y, expect, rtol=1e-5)
    assert spec.item_vocab == (6, 61)
    assert task.support.x["user"][..., 0].max() < spec.user_vocab[0]


# ---------------------------------------------------------------- fetching
def _zip_fixture(tmp_path):
    src = write_ml100k(tmp_path / "src" / "ml-100k")
    zpath = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in os.listdir(src):
            z.write(os.path.join(src, f), f"ml-100k/{f}")
    return zpath


def test_download_grouplens_checks_md5(tmp_path):
    zpath = _zip_fixture(tmp_path)
    md5 = hashlib.md5(zpath.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    out = fetch.download_grouplens("ml-100k", str(cache), url=zpath.as_uri(), md5=md5)
    assert sorted(os.listdir(out)) == ["u.data", "u.item", "u.user"]
    assert len(load(out).users) == 60
    with pytest.raises(readers.DataFormatError, match="md5 checksum mismatch"):
        fetch.download_grouplens("ml-100k", str(tmp_path / "c2"), url=zpath.as_uri(), md5="0" * 32)
    # the cache is then found without any download
    assert fetch.ensure_dataset("ml-100k", cache_dir=str(cache)) == out


def test_extract_from_recbole_wheel(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in fetch.RECBOLE_ML100K_SHA256:
            z.writestr(f"recbole/dataset_example/ml-100k/{name}", "x")
    out = fetch.extract_from_recbole_wheel(str(wheel), str(tmp_path / "dest"), check=False)
    assert sorted(os.listdir(out)) == sorted(fetch.RECBOLE_ML100K_SHA256)
    with pytest.raises(readers.DataFormatError, match="sha256 checksum mismatch"):
        fetch.extract_from_recbole_wheel(str(wheel), str(tmp_path / "dest2"), check=True)


def test_ensure_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'ml-25m'; valid: \['ml-100k', 'ml-1m'\]"):
        fetch.ensure_dataset("ml-25m")
    with pytest.raises(readers.DataFormatError, match="--data_dir does not exist"):
        fetch.ensure_dataset("ml-100k", data_dir=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        fetch.ensure_dataset("ml-1m", cache_dir=str(tmp_path))
