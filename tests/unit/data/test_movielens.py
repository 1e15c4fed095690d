"""Cleaning: fatal values name the file, line and field; dropped and repaired rows are counted."""

from __future__ import annotations

import logging
import os

import pytest

from metarec.data import readers
from tests.conftest import MALFORMED_RATING, load_ml100k, write_ml100k


def test_unparseable_rating_is_fatal_with_line_and_field(malformed_ml100k_dir):
    d = malformed_ml100k_dir
    n_lines = sum(1 for _ in open(os.path.join(d, "u.data")))
    assert MALFORMED_RATING.split("\t")[2] == "four"
    with pytest.raises(
        readers.DataFormatError,
        match=rf"u\.data, line {n_lines}, field 'rating': expected a number, got 'four'",
    ):
        load_ml100k(d)


def test_cleaning_counts(tmp_path):
    extra = [
        "1\t1\t9\t881250949",  # out of scale
        "999\t1\t3\t881250949",  # unknown user
        "1\t999\t3\t881250949",  # unknown item
        "2\t70\t1\t100",  # duplicate pair: older ...
        "2\t70\t5\t999999999",  # ... and newer -> kept
    ]
    d = load_ml100k(write_ml100k(tmp_path / "a", extra_ratings=extra, seed=3))
    r = d.report
    assert r["ratings_out_of_scale"] == 1
    assert r["ratings_unknown_user"] == 1
    assert r["ratings_unknown_item"] == 1
    assert r["ratings_duplicate"] >= 1
    row = d.ratings[(d.ratings.user_id == 2) & (d.ratings.item_id == 70)]
    assert len(row) == 1 and row.rating.item() == 5.0 and row.timestamp.item() == 999999999
    assert r["ratings_kept"] == r["ratings_read"] - 3 - r["ratings_duplicate"]


def test_dropped_ratings_are_counted_and_named(tmp_path, caplog):
    extra = ["1\t1\t9\t881250949", "999\t1\t3\t881250949", "1\t999\t3\t881250949"]
    d = write_ml100k(tmp_path / "ml-100k", extra_ratings=extra)
    n = sum(1 for _ in open(os.path.join(d, "u.data")))
    with caplog.at_level(logging.WARNING, logger="metarec.data"):
        data = load_ml100k(d)
    assert data.report["ratings_out_of_scale"] == 1
    assert data.report["ratings_unknown_user"] == 1 and data.report["ratings_unknown_item"] == 1
    text = caplog.text
    assert (
        f"dropped 1 rating(s) outside the rating scale [1, 5] "
        f"(first: line {n - 2}, field 'rating' = 9.0)" in text
    )
    assert (
        f"with a user id absent from {os.path.join(d, 'u.user')} "
        f"(first: line {n - 1}, field 'user_id' = 999)" in text
    )
    assert (
        f"with an item id absent from {os.path.join(d, 'u.item')} "
        f"(first: line {n}, field 'item_id' = 999)" in text
    )
