"""Readers of the GroupLens and RecBole layouts, and their structural errors: each names the file,
line and field (and what was expected)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from metarec.data import readers
from metarec.data.movielens import clean
from tests.conftest import load_ml100k, rewrite_lines, write_ml100k


def test_read_ml100k_fixture(ml100k_dir):
    d = load_ml100k(ml100k_dir)
    assert len(d.users) == 60 and len(d.items) == 80
    assert d.report["items_unknown_year"] == 2  # item 3 ('V') and item 4 (empty)
    assert set(d.items.loc[d.items.item_id.isin([3, 4]), "year"]) == {"unknown"}
    assert d.items.loc[d.items.item_id == 5, "year"].item() == "1995"
    # latin-1 kept
    assert d.items.loc[d.items.item_id == 1, "title"].item().startswith("Movie Ã© 1")
    assert d.genres == readers.ML100K_GENRES
    assert d.ratings.dtypes["rating"] == np.float32
    assert d.report["ratings_kept"] == d.report["ratings_read"] == len(d.ratings)
    # occupation 'none' is a real ml-100k category, not a missing value
    assert "none" in set(d.users.occupation)


def test_read_ml1m_separators_and_latin1(tmp_path):
    directory = tmp_path / "ml-1m"
    directory.mkdir()
    (directory / "users.dat").write_text(
        "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n"
    )
    (directory / "movies.dat").write_bytes(
        (
            "1::Toy Story (1995)::Animation|Children's|Comedy\n"
            "2::Cité des enfants perdus, La (1995)::Adventure|Sci-Fi\n"
            "3::Some Film::Drama\n"
        ).encode("latin-1")
    )
    (directory / "ratings.dat").write_text(
        "1::1::5::978300760\n1::2::3::978302109\n2::1::4::978301968\n3::3::2::978300000\n"
    )
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
    (directory / "toy.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t4\t5\n2\t10\t2\t6\n"
    )
    (directory / "toy.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n"
    )
    (directory / "toy.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tToy Story\t1995\tAnimation Comedy\n"
    )
    d = clean(readers.read_any(str(directory)), "toy")
    assert d.format == "recbole"
    assert d.items.genres.iloc[0] == ("Animation", "Comedy")
    assert d.ratings.rating.tolist() == [4.0, 2.0]


# ---------------------------------------------------------------- structural errors
def test_recbole_header_without_types_is_an_error(tmp_path):
    (tmp_path / "x.inter").write_text("user_id\titem_id\trating\n1\t2\t3\n")
    with pytest.raises(
        readers.DataFormatError, match=r"x\.inter, line 1, field 'user_id'.*typed headers"
    ):
        readers.read_recbole(str(tmp_path))


def test_recbole_missing_column_is_an_error(tmp_path):
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\n1\t2\n")
    (tmp_path / "x.user").write_text("user_id:token\n1\n")
    (tmp_path / "x.item").write_text("item_id:token\n2\n")
    with pytest.raises(readers.DataFormatError, match=r"missing column for 'rating'"):
        readers.read_recbole(str(tmp_path))


def test_recbole_duplicate_header_column(tmp_path):
    (tmp_path / "x.inter").write_text("user_id:token\tuser_id:token\n1\t2\n")
    with pytest.raises(
        readers.DataFormatError,
        match=r"x\.inter, line 1, field 'user_id:token': column 'user_id' appears twice",
    ):
        readers.read_recbole(str(tmp_path))


def test_wrong_delimiter_names_file_and_line(tmp_path):
    d = write_ml100k(tmp_path / "a")
    with open(os.path.join(d, "u.data"), "w") as f:
        f.write("1,2,3,881250949\n")
    with pytest.raises(
        readers.DataFormatError, match=r"u\.data, line 1: expected 4 fields .*delimiter"
    ):
        load_ml100k(d)


def test_extra_column_names_line(tmp_path):
    d = write_ml100k(tmp_path / "a", extra_ratings=["1\t2\t3\t881250949\t7"])
    with pytest.raises(readers.DataFormatError, match=r"u\.data, line \d+: expected 4 fields"):
        load_ml100k(d)


def test_ml1m_with_tabs_names_the_delimiter(tmp_path):
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "users.dat").write_text("1::F::1::10::48067\n")
    (d / "movies.dat").write_text("1::Toy Story (1995)::Animation\n")
    (d / "ratings.dat").write_text("1\t1\t5\t978300760\n")
    with pytest.raises(
        readers.DataFormatError,
        match=r"ratings\.dat, line 1: expected 4 fields separated by '::'.*delimiter",
    ):
        clean(readers.read_any(str(d)), "ml-1m")


def test_missing_file_and_unknown_layout(tmp_path):
    with pytest.raises(readers.DataFormatError, match="data directory not found"):
        readers.read_any(str(tmp_path / "nope"))
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(readers.DataFormatError, match="no MovieLens files found"):
        readers.read_any(str(tmp_path))
    with pytest.raises(readers.DataFormatError, match=r"u\.data: file not found"):
        readers.read_grouplens_100k(str(tmp_path))


# one bad ml-100k file each: (file, edit of its lines or None to delete it, expected message)
BAD_ML100K_FILES = {
    "missing-file": ("u.item", None, r"u\.item: file not found"),
    "wrong-delimiter": (
        "u.user",
        lambda ls: [ls[0].replace("|", ",")] + ls[1:],
        r"u\.user, line 1: expected 5 fields separated by '\|' \(user_id, age, gender, "
        r"occupation, zip_code\), found 1 \(is the delimiter really '\|'\?\)",
    ),
    "extra-column": (
        "u.user",
        lambda ls: ls[:2] + [ls[2] + "|extra"] + ls[3:],
        r"u\.user, line 3: expected 5 fields .* found 6",
    ),
    "missing-column": (
        "u.data",
        lambda ls: ls[:4] + ["1\t2\t3"] + ls[4:],
        r"u\.data, line 5: expected 4 fields .* found 3",
    ),
    "bad-timestamp": (
        "u.data",
        lambda ls: ls + ["1\t2\t4.5\tsoon"],
        r"u\.data, line \d+, field 'timestamp': expected an integer",
    ),
    "nan-rating": (
        "u.data",
        lambda ls: ls + ["1\t2\tnan\t881250949"],
        r"u\.data, line \d+, field 'rating': expected a number, got 'nan'",
    ),
    "int64-overflow": (
        "u.data",
        lambda ls: ls + ["99999999999999999999\t2\t3\t881250949"],
        r"u\.data, line \d+, field 'user_id': expected an integer \(within int64\)",
    ),
    "non-numeric-id": (
        "u.user",
        lambda ls: ls + ["x1|20|M|none|12345"],
        r"u\.user, line \d+, field 'user_id': expected an integer",
    ),
    "duplicate-user": (
        "u.user",
        lambda ls: ls + [ls[0]],
        r"u\.user, line \d+, field 'user_id': duplicate user id 1",
    ),
    "bad-genre-flag": (
        "u.item",
        lambda ls: [ls[0].rsplit("|", 1)[0] + "|2"] + ls[1:],
        r"u\.item, line 1, field 'Western': genre flag must be 0 or 1, got '2'",
    ),
    "empty-file": ("u.data", lambda ls: [], r"u\.data: no ratings: the file has no data lines"),
}


@pytest.mark.parametrize("case", list(BAD_ML100K_FILES))
def test_bad_ml100k_file(tmp_path, case):
    file, edit, message = BAD_ML100K_FILES[case]
    d = write_ml100k(tmp_path / "ml-100k")
    path = os.path.join(d, file)
    if edit is None:
        os.remove(path)
    else:
        rewrite_lines(path, edit)
    with pytest.raises(readers.DataFormatError, match=message):
        load_ml100k(d)
