"""A corpus of bad inputs, each expecting a clear message (file, line, field, what was expected) and
no traceback from deep inside pandas/JAX. Readers' basic cases live in tests/test_data.py; these add
the rest (and the script-level behaviour)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from metarec import coldstart
from metarec import data as mdata
from metarec.data import fetch, readers
from metarec.data.movielens import clean
from metarec.meta import make_learner
from tests.conftest import write_ml100k

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(d):
    return clean(readers.read_any(str(d)), "ml-100k")


def _rewrite(path, edit):
    with open(path, encoding="latin-1") as f:
        lines = f.read().splitlines()
    lines = edit(lines)
    with open(path, "w", encoding="latin-1") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------- files
@pytest.mark.parametrize(
    "file,edit,message",
    [
        ("u.item", None, r"u\.item: file not found"),
        ("u.user", lambda ls: [ls[0].replace("|", ",")] + ls[1:],
         r"u\.user, line 1: expected 5 fields separated by '\|' \(user_id, age, gender, occupation, zip_code\), "
         r"found 1 \(is the delimiter really '\|'\?\)"),
        ("u.user", lambda ls: ls[:2] + [ls[2] + "|extra"] + ls[3:], r"u\.user, line 3: expected 5 fields .* found 6"),
        ("u.data", lambda ls: ls[:4] + ["1\t2\t3"] + ls[4:], r"u\.data, line 5: expected 4 fields .* found 3"),
        ("u.data", lambda ls: ls + ["1\t2\t4.5\tsoon"], r"u\.data, line \d+, field 'timestamp': expected an integer"),
        ("u.data", lambda ls: ls + ["1\t2\tnan\t881250949"], r"u\.data, line \d+, field 'rating': expected a number, got 'nan'"),
        ("u.data", lambda ls: ls + ["99999999999999999999\t2\t3\t881250949"],
         r"u\.data, line \d+, field 'user_id': expected an integer \(within int64\)"),
        ("u.user", lambda ls: ls + ["x1|20|M|none|12345"], r"u\.user, line \d+, field 'user_id': expected an integer"),
        ("u.user", lambda ls: ls + [ls[0]], r"u\.user, line \d+, field 'user_id': duplicate user id 1"),
        ("u.item", lambda ls: [ls[0].rsplit("|", 1)[0] + "|2"] + ls[1:], r"u\.item, line 1, field 'Western': genre flag must be 0 or 1, got '2'"),
        ("u.data", lambda ls: [], r"u\.data: no ratings: the file has no data lines"),
    ],
    ids=["missing-file", "wrong-delimiter", "extra-column", "missing-column", "bad-timestamp", "nan-rating",
         "int64-overflow", "non-numeric-id", "duplicate-user", "bad-genre-flag", "empty-file"],
)  # fmt: skip
def test_bad_ml100k_file(tmp_path, file, edit, message):
    d = write_ml100k(tmp_path / "ml-100k")
    path = os.path.join(d, file)
    if edit is None:
        os.remove(path)
    else:
        _rewrite(path, edit)
    with pytest.raises(readers.DataFormatError, match=message):
        load(d)


def test_ml1m_with_tabs_names_the_delimiter(tmp_path):
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "users.dat").write_text("1::F::1::10::48067\n")
    (d / "movies.dat").write_text("1::Toy Story (1995)::Animation\n")
    (d / "ratings.dat").write_text("1\t1\t5\t978300760\n")
    with pytest.raises(readers.DataFormatError, match=r"ratings\.dat, line 1: expected 4 fields separated by '::'.*delimiter"):
        clean(readers.read_any(str(d)), "ml-1m")


def test_recbole_duplicate_header_column(tmp_path):
    (tmp_path / "x.inter").write_text("user_id:token\tuser_id:token\n1\t2\n")
    with pytest.raises(readers.DataFormatError, match=r"x\.inter, line 1, field 'user_id:token': column 'user_id' appears twice"):
        readers.read_recbole(str(tmp_path))


def test_dropped_ratings_are_counted_and_named(tmp_path, caplog):
    d = write_ml100k(tmp_path / "ml-100k", extra_ratings=["1\t1\t9\t881250949", "999\t1\t3\t881250949", "1\t999\t3\t881250949"])
    n = sum(1 for _ in open(os.path.join(d, "u.data")))
    with caplog.at_level(logging.WARNING, logger="metarec.data"):
        data = load(d)
    assert data.report["ratings_out_of_scale"] == 1
    assert data.report["ratings_unknown_user"] == 1 and data.report["ratings_unknown_item"] == 1
    text = caplog.text
    assert f"dropped 1 rating(s) outside the rating scale [1, 5] (first: line {n - 2}, field 'rating' = 9.0)" in text
    assert f"with a user id absent from {os.path.join(d, 'u.user')} (first: line {n - 1}, field 'user_id' = 999)" in text
    assert f"with an item id absent from {os.path.join(d, 'u.item')} (first: line {n}, field 'item_id' = 999)" in text


def test_unknown_dataset_and_missing_data_dir(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'ml-25m'; valid: \['ml-100k', 'ml-1m'\]"):
        mdata.load_dataset("ml-25m")
    with pytest.raises(readers.DataFormatError, match="--data_dir does not exist"):
        fetch.ensure_dataset("ml-100k", data_dir=str(tmp_path / "nope"))


# ---------------------------------------------------------------- scenarios, tasks
def test_empty_scenarios_after_filtering(tmp_path):
    # every user has at most 12 ratings: no scenario keeps anyone under the 13..100 rule
    data = load(write_ml100k(tmp_path / "s", n_users=40, n_items=60, min_per_user=5, max_per_user=12))
    with pytest.raises(ValueError, match=r"scenario\(s\) \['warm_train', 'warm_test', 'user_cold', 'item_cold', "
                                         r"'user_item_cold'\] are empty after filtering for ml-100k / protocol melu / seed 0 "
                                         r"\(each user needs 13\.\.100 ratings"):  # fmt: skip
        coldstart.prepare_seed(data, 0, coldstart.default_config())


def test_support_smaller_than_requested():
    sets = mdata.UserSets(
        user_id=np.array([7, 8]), support_item=np.array([[1, 2, 3], [4, 5, 0]]),
        support_rating=np.array([[3.0, 4, 5], [1, 2, 0]], np.float32), support_mask=np.array([[1.0, 1, 1], [1, 1, 0]], np.float32),
        support_time=np.zeros((2, 3), np.int64), query_item=np.array([[9], [9]]), query_rating=np.ones((2, 1), np.float32),
        query_mask=np.ones((2, 1), np.float32), query_time=np.zeros((2, 1), np.int64),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"scenario user_cold: user 8 has 2 support ratings, fewer than the requested 3 "
                                         r"\(1 of 2 users are short; smallest support set 2\)"):  # fmt: skip
        coldstart.subsample_support(sets, 3, scenario="user_cold")
    out = coldstart.subsample_support(sets, 3, strict=False)
    assert out.user_id.tolist() == [7]
    cut = coldstart.subsample_support(sets, 1)
    np.testing.assert_array_equal(cut.support_mask, [[1, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(cut.support_rating, [[3, 0, 0], [1, 0, 0]])
    assert cut.support_item.shape == sets.support_item.shape


@pytest.mark.parametrize("where,value", [("offset", np.nan), ("genres", np.inf), ("y", -np.inf)])
def test_non_finite_features_are_named(where, value):
    tasks, _, _ = mdata.make_synthetic_tasks(seed=0, n_users=5, n_items=30, n_support=4, n_query=3)
    if where == "y":
        tasks.support.y[3, 2] = value
        field = r"support\.y"
    else:
        tasks.query.x[where][3, 2, ...] = value
        field = rf"query\.x\['{where}'\]"
    n = 1 if where != "genres" else tasks.query.x["genres"].shape[-1]
    with pytest.raises(ValueError, match=rf"training tasks: {n} non-finite value\(s\) \(NaN/inf\) in {field} \(first at "
                                         rf"index \(3, 2.*\), user {int(tasks.user[3])}"):  # fmt: skip
        coldstart.check_finite_tasks(tasks, "training tasks")


# ---------------------------------------------------------------- config, names, workdir
@pytest.mark.parametrize(
    "field,value,message",
    [("algos", ["maml", "maml"], r"--algo lists \['maml'\] more than once"), ("seeds", [-1], "--seeds must be non-negative"),
     ("ckpt_every", -1, "--ckpt_every must be >= 0"), ("keep_checkpoints", 0, "--keep_checkpoints must be >= 1"),
     ("curve_support", [0, 5], r"--curve_support values must be integers >= 1, got \[0, 5\]"),
     ("patience", 0, "--patience must be >= 1"), ("val_fraction", 1.0, r"--val_fraction must be in \(0, 1\)")],
)  # fmt: skip
def test_bad_config_values(field, value, message):
    cfg = coldstart.default_config()
    cfg[field] = value
    with pytest.raises(ValueError, match=message):
        coldstart.validate_config(cfg)


def test_unknown_algorithm_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown algorithm 'mamal'; valid: \['maml', 'fomaml'"):
        coldstart.build_learner("mamal", lambda p, x: x, coldstart.default_config())
    with pytest.raises((ValueError, KeyError), match="mamal"):
        make_learner("mamal", lambda p, x: x)


def test_workdir_rules(tmp_path):
    cfg = coldstart.default_config()
    wd = str(tmp_path / "run")
    assert coldstart._prepare_workdir(cfg, wd, resume=False, data_sha256="abc", log_fn=lambda m: None) == []
    with pytest.raises(ValueError, match=r"already holds a run \(config\.json\); pass --resume to continue it, --overwrite"):
        coldstart._prepare_workdir(cfg, wd, resume=False, data_sha256="abc", log_fn=lambda m: None)
    other = coldstart.default_config()
    other.embed_dim, other.epochs = 8, 99
    with pytest.raises(ValueError, match=r"different config \(embed_dim: 32 -> 8\); only epochs, patience"):
        coldstart._prepare_workdir(other, wd, resume=True, data_sha256="abc", log_fn=lambda m: None)
    with pytest.raises(ValueError, match=r"the data changed since the run .* \(ratings sha256 abc\.\.\. -> def\.\.\.\)"):
        coldstart._prepare_workdir(cfg, wd, resume=True, data_sha256="def", log_fn=lambda m: None)
    other = coldstart.default_config()
    other.epochs, other.meta_lr = 99, 1e-4  # allowed: e.g. to recover from a non-finite loss
    assert coldstart._prepare_workdir(other, wd, resume=True, data_sha256="abc", log_fn=lambda m: None) == ["epochs", "meta_lr"]
    # a field added to the code after the run started is accepted (its default is used) and reported
    saved = json.load(open(os.path.join(wd, "config.json")))
    del saved["config"]["embed_dim"]
    json.dump(saved, open(os.path.join(wd, "config.json"), "w"))
    logged = []
    assert coldstart._prepare_workdir(cfg, wd, resume=True, data_sha256="abc", log_fn=logged.append) == [
        "embed_dim", "epochs", "meta_lr"]
    assert "config fields new since the run started (their defaults are used): embed_dim" in logged[0]


# ---------------------------------------------------------------- the script (absl validators, clean exits)
def _script(*flags):
    return subprocess.run([sys.executable, "-m", "experiments.meta_train", *flags], cwd=REPO, capture_output=True,
                          text=True, timeout=180)  # fmt: skip


@pytest.mark.parametrize(
    "flags,message",
    [(["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
     (["--seeds=0,one"], "--seeds takes a comma list of integers, got '0,one'"),
     pytest.param(["--data_dir=/x", "--download"], "--download fetches GroupLens' zip into the cache; it cannot be "
                  "combined with --data_dir", marks=pytest.mark.slow),
     pytest.param(["--dataset=ml-25m"], "value should be one of <ml-100k|ml-1m>", marks=pytest.mark.slow)],
    ids=["resume+overwrite", "bad-seeds", "data_dir+download", "unknown-dataset"],
)  # fmt: skip
def test_script_rejects_bad_flags(tmp_path, flags, message):
    out = _script(*flags, f"--workdir={tmp_path}")
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_script_reports_data_errors_without_traceback(tmp_path):
    d = write_ml100k(tmp_path / "ml-100k")
    _rewrite(os.path.join(d, "u.data"), lambda ls: ls + ["1\t2\tfour\t881250949"])
    out = _script(f"--data_dir={d}", f"--workdir={tmp_path / 'run'}")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith(f"meta_train: error: {os.path.join(d, 'u.data')}, line ")
    assert "field 'rating': expected a number, got 'four'" in out.stderr
    assert "Traceback" not in out.stderr
