"""Fuzzing the file readers (hypothesis, bounded: ~20 s in all on 2 cores).

Property: whatever bytes are in the files, ``read_any`` + ``clean`` either return a dataset whose
ratings are within the scale and whose ids are known, or raise :class:`DataFormatError` (a
``ValueError``) whose message starts with the path of a file it read — never a traceback from inside
pandas/numpy (KeyError, IndexError, OverflowError, TypeError, ...).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metarec.data import readers
from metarec.data.movielens import clean
from tests.conftest import write_ml100k

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

# fields that look almost right: numbers of every kind, near-miss tokens and junk
_field = st.one_of(
    st.integers(-3, 2000).map(str),
    st.sampled_from(
        [
            "",
            " ",
            "nan",
            "inf",
            "-inf",
            "1e400",
            "99999999999999999999",
            "18446744073709551615",
            "9223372036854775808",
            "3.5",
            "4.0",
            "0x10",
            "1_000",
            "four",
            "V",
            "unknown",
            "M",
            "F",
            "01-Jan-1995",
            "Toy Story (1995)",
            "Action|Comedy",
            "\u00e9\u00e8",
            "\x00",
            "1997",
            "-1",
        ]
    ),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8),
)


def _lines(sep: str, n_fields: st.SearchStrategy, max_lines=8):
    line = n_fields.flatmap(lambda n: st.lists(_field, min_size=n, max_size=n)).map(sep.join)
    return st.lists(line, max_size=max_lines).map(lambda ls: "\n".join(ls) + "\n")


def _check(directory: str, name: str = "ml-100k"):
    try:
        data = clean(readers.read_any(directory), name)
    except readers.DataFormatError as e:
        assert str(e).startswith(os.path.abspath(directory)) or str(e).startswith(directory), str(e)
        return None
    r = data.ratings
    assert ((r.rating >= 1) & (r.rating <= 5)).all()
    assert set(r.user_id) <= set(data.users.user_id) and set(r.item_id) <= set(data.items.item_id)
    assert r.user_id.dtype == np.int64 and r.timestamp.dtype == np.int64
    assert not r.duplicated(["user_id", "item_id"]).any()
    return data


class _Dir:
    """A fresh copy of a valid fixture per example (hypothesis reuses the test's arguments)."""

    def __init__(self, src):
        self.src = src

    def __enter__(self):
        self.path = tempfile.mkdtemp(prefix="fuzz")
        for f in os.listdir(self.src):
            shutil.copy(os.path.join(self.src, f), self.path)
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


_ML100K = None


def _ml100k():
    global _ML100K
    if _ML100K is None:
        directory = tempfile.mkdtemp(prefix="fuzzsrc") + "/ml-100k"
        _ML100K = write_ml100k(directory, n_users=8, n_items=10, max_per_user=6)
    return _ML100K


@FUZZ
@given(
    which=st.sampled_from(["u.data", "u.user", "u.item"]),
    body=st.one_of(
        _lines("\t", st.integers(1, 6)),
        _lines("|", st.sampled_from([1, 4, 5, 6, 23, 24, 25])),
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    ),
)
def test_fuzz_ml100k_files(which, body):
    with _Dir(_ml100k()) as d:
        with open(os.path.join(d, which), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(body)
        _check(d)


@FUZZ
@given(
    extra=st.lists(st.lists(_field, min_size=4, max_size=4).map("\t".join), min_size=1, max_size=6)
)
def test_fuzz_ml100k_appended_ratings(extra):
    """Valid files plus a few almost-valid rating lines (the likeliest real-world corruption)."""
    with _Dir(_ml100k()) as d:
        with open(os.path.join(d, "u.data"), "a") as f:
            f.write("\n".join(extra) + "\n")
        _check(d)


@FUZZ
@given(
    ratings=_lines("::", st.integers(3, 5)),
    users=_lines("::", st.integers(4, 6)),
    movies=_lines("::", st.integers(2, 4)),
)
def test_fuzz_ml1m_files(ratings, users, movies):
    d = tempfile.mkdtemp(prefix="fuzz1m")
    try:
        for name, body in (("ratings.dat", ratings), ("users.dat", users), ("movies.dat", movies)):
            with open(os.path.join(d, name), "w", encoding="latin-1", errors="replace") as f:
                f.write(body)
        _check(d, "ml-1m")
    finally:
        shutil.rmtree(d, ignore_errors=True)


_header_field = st.one_of(
    st.sampled_from(
        [
            "user_id:token",
            "item_id:token",
            "rating:float",
            "timestamp:float",
            "age:token",
            "gender:token",
            "occupation:token",
            "zip_code:token",
            "movie_title:token_seq",
            "release_year:token",
            "class:token_seq",
            "user_id",
            "rating",
            ":",
            "x:y:z",
        ]
    ),
    st.text(max_size=6),
)


@FUZZ
@given(
    inter_h=st.lists(_header_field, min_size=1, max_size=5),
    inter=_lines("\t", st.integers(1, 5)),
    user_h=st.lists(_header_field, min_size=1, max_size=6),
    item_h=st.lists(_header_field, min_size=1, max_size=5),
)
def test_fuzz_recbole_files(inter_h, inter, user_h, item_h):
    d = tempfile.mkdtemp(prefix="fuzzrb")
    try:
        body = {
            "inter": "\t".join(inter_h) + "\n" + inter,
            "user": "\t".join(user_h) + "\n1\t20\tM\tx\t12345\n",
            "item": "\t".join(item_h) + "\n1\tT\t1995\tDrama\n",
        }
        for ext, text in body.items():
            path = os.path.join(d, f"toy.{ext}")
            with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
                f.write(text)
        _check(d, "toy")
    finally:
        shutil.rmtree(d, ignore_errors=True)
