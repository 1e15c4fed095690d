"""Readers for MovieLens in GroupLens' own formats and in RecBole atomic files.

Every reader returns a :class:`RawData` of string-typed pandas frames with one row per input line
and a ``_line`` column holding the 1-based line number in the source file, so that later checks can
name the file, line and field of a bad value. Structural problems (missing file, wrong delimiter,
wrong number of columns, missing header fields) raise :class:`DataFormatError` at once.

Supported layouts (``detect_format`` picks one from the files present in a directory):

* ``grouplens-100k``: ``u.data`` (tab: user, item, rating, timestamp), ``u.user``
  (``|``: user, age, gender, occupation, zip), ``u.item`` (``|``, latin-1: item, title, release
  date, video release date, IMDb URL, 19 genre flags).
* ``grouplens-1m``: ``ratings.dat`` / ``users.dat`` / ``movies.dat`` with ``::`` separators,
  latin-1, genres as ``A|B|C``, the release year inside the title ``"Toy Story (1995)"``, ages and
  occupations as codes.
* ``recbole``: ``<name>.inter`` / ``<name>.user`` / ``<name>.item`` with typed headers
  (``user_id:token<TAB>item_id:token<TAB>rating:float...``).
"""

from __future__ import annotations

import dataclasses
import os
import re

import pandas as pd

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

# ml-1m's occupation codes (README of ml-1m).
ML1M_OCCUPATIONS = (
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)


class DataFormatError(ValueError):
    """A data file is missing or malformed. The message names the file, line and field."""

    def __init__(self, path: str, message: str, line: int | None = None, field: str | None = None):
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.field = str(path), line, field


@dataclasses.dataclass(frozen=True)
class RawData:
    """String-typed frames straight from the files (plus ``_line``); see
    :mod:`metarec.data.movielens` for typing and cleaning. ``items`` has columns item_id, title,
    year, genres (genres joined by '|')."""

    ratings: pd.DataFrame  # user_id, item_id, rating, timestamp, _line
    users: pd.DataFrame  # user_id, age, gender, occupation, zip_code, _line
    items: pd.DataFrame  # item_id, title, year, genres, _line
    paths: dict[str, str]
    format: str


def _require(path: str) -> None:
    if not os.path.isfile(path):
        raise DataFormatError(path, "file not found")


def read_delimited(
    path: str,
    sep: str,
    names: list[str],
    *,
    encoding: str = "utf-8",
    skip_header: bool = False,
    min_fields: int | None = None,
) -> pd.DataFrame:
    """Read a delimited text file into a frame of strings with a 1-based ``_line`` column.

    ``sep`` may be multi-character (``'::'``). Every non-blank line must have exactly
    ``len(names)`` fields (or at least ``min_fields``, the missing trailing ones becoming empty
    strings); blank lines are skipped. Errors name the file and line and say what was expected.
    """
    _require(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = text.splitlines()
    start = 1 if skip_header else 0
    n_expected = len(names)
    min_fields = n_expected if min_fields is None else min_fields
    rows, line_numbers = [], []
    for i in range(start, len(lines)):
        line = lines[i]
        if not line.strip():
            continue
        fields = line.split(sep)
        if len(fields) < min_fields or len(fields) > n_expected:
            hint = ""
            if len(fields) == 1:
                hint = f" (is the delimiter really {sep!r}?)"
            raise DataFormatError(
                path,
                f"expected {n_expected} fields separated by {sep!r} ({', '.join(names)}), "
                f"found {len(fields)}{hint}",
                line=i + 1,
            )
        if len(fields) < n_expected:
            fields = fields + [""] * (n_expected - len(fields))
        rows.append(fields)
        line_numbers.append(i + 1)
    frame = pd.DataFrame(rows, columns=names, dtype=object)
    frame["_line"] = line_numbers
    return frame


def _read_recbole(path: str, wanted: dict[str, list[str]]) -> pd.DataFrame:
    """Read a RecBole atomic file (typed header ``name:type``); the wanted columns, renamed.

    ``wanted`` maps our column name to a list of acceptable header names (first found wins).
    """
    _require(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        header_line = f.readline().rstrip("\n\r")
    header = header_line.split("\t")
    names = []
    for h in header:
        if ":" not in h:
            raise DataFormatError(
                path,
                f"header field {h!r} has no ':type' suffix; RecBole atomic files need typed "
                "headers like 'user_id:token'",
                line=1,
                field=h,
            )
        name = h.split(":", 1)[0]
        if name in names:
            raise DataFormatError(
                path, f"column {name!r} appears twice in the header", line=1, field=h
            )
        names.append(name)
    frame = read_delimited(path, "\t", names, skip_header=True, min_fields=1)
    out = {}
    for ours, candidates in wanted.items():
        found = next((c for c in candidates if c in names), None)
        if found is None:
            raise DataFormatError(
                path,
                f"missing column for {ours!r}: expected one of {candidates} in the header",
                line=1,
            )
        out[ours] = frame[found]
    out["_line"] = frame["_line"]
    return pd.DataFrame(out)


def read_grouplens_100k(directory: str) -> RawData:
    """Read ml-100k in GroupLens' layout (``u.data``, ``u.user``, ``u.item``)."""
    p = {
        k: os.path.join(directory, f)
        for k, f in (("ratings", "u.data"), ("users", "u.user"), ("items", "u.item"))
    }
    ratings = read_delimited(p["ratings"], "\t", ["user_id", "item_id", "rating", "timestamp"])
    users = read_delimited(p["users"], "|", ["user_id", "age", "gender", "occupation", "zip_code"])
    item_cols = ["item_id", "title", "release_date", "video_release_date", "url", *ML100K_GENRES]
    items = read_delimited(p["items"], "|", item_cols, encoding="latin-1")
    years = items["release_date"].str.extract(r"(\d{4})\s*$", expand=False).fillna("")
    flags = items[list(ML100K_GENRES)]
    bad = ~flags.isin(["0", "1"])
    if bad.to_numpy().any():
        r, c = map(int, next(zip(*bad.to_numpy().nonzero(), strict=True)))
        raise DataFormatError(
            p["items"],
            f"genre flag must be 0 or 1, got {flags.iat[r, c]!r}",
            line=int(items["_line"].iat[r]),
            field=ML100K_GENRES[c],
        )
    genres = flags.apply(
        lambda row: "|".join(g for g, v in zip(ML100K_GENRES, row, strict=True) if v == "1"),
        axis=1,
    )
    items = pd.DataFrame(
        {
            "item_id": items["item_id"],
            "title": items["title"],
            "year": years,
            "genres": genres,
            "_line": items["_line"],
        }
    )
    return RawData(ratings, users, items, p, "grouplens-100k")


def read_grouplens_1m(directory: str) -> RawData:
    """Read ml-1m in GroupLens' layout (``ratings.dat``, ``users.dat``, ``movies.dat``, ``::``)."""
    p = {
        k: os.path.join(directory, f)
        for k, f in (("ratings", "ratings.dat"), ("users", "users.dat"), ("items", "movies.dat"))
    }
    ratings = read_delimited(p["ratings"], "::", ["user_id", "item_id", "rating", "timestamp"])
    users = read_delimited(p["users"], "::", ["user_id", "gender", "age", "occupation", "zip_code"])
    occ = pd.to_numeric(users["occupation"], errors="coerce")
    users["occupation"] = [
        ML1M_OCCUPATIONS[int(o)] if o == o and 0 <= o < len(ML1M_OCCUPATIONS) else raw
        for o, raw in zip(occ, users["occupation"], strict=True)
    ]
    users = users[["user_id", "age", "gender", "occupation", "zip_code", "_line"]]
    movies = read_delimited(p["items"], "::", ["item_id", "title", "genres"], encoding="latin-1")
    years = movies["title"].str.extract(r"\((\d{4})\)\s*$", expand=False).fillna("")
    titles = movies["title"].str.replace(r"\s*\(\d{4}\)\s*$", "", regex=True)
    items = pd.DataFrame(
        {
            "item_id": movies["item_id"],
            "title": titles,
            "year": years,
            "genres": movies["genres"],
            "_line": movies["_line"],
        }
    )
    return RawData(ratings, users, items, p, "grouplens-1m")


def read_recbole(directory: str, name: str | None = None) -> RawData:
    """Read RecBole atomic files ``<name>.inter/.user/.item`` from ``directory``.

    ``name`` defaults to the stem of the single ``*.inter`` file in the directory. Genres come from
    the item file's ``class``/``genre`` token_seq column (space-separated).
    """
    if name is None:
        inters = (
            sorted(f for f in os.listdir(directory) if f.endswith(".inter"))
            if os.path.isdir(directory)
            else []
        )
        if len(inters) != 1:
            raise DataFormatError(
                directory, f"expected exactly one *.inter file, found {inters or 'none'}"
            )
        name = inters[0][: -len(".inter")]
    p = {
        k: os.path.join(directory, f"{name}.{ext}")
        for k, ext in (("ratings", "inter"), ("users", "user"), ("items", "item"))
    }
    ratings = _read_recbole(
        p["ratings"],
        {
            "user_id": ["user_id"],
            "item_id": ["item_id"],
            "rating": ["rating"],
            "timestamp": ["timestamp"],
        },
    )
    users = _read_recbole(
        p["users"],
        {
            "user_id": ["user_id"],
            "age": ["age"],
            "gender": ["gender"],
            "occupation": ["occupation"],
            "zip_code": ["zip_code"],
        },
    )
    items = _read_recbole(
        p["items"],
        {
            "item_id": ["item_id"],
            "title": ["movie_title", "title"],
            "year": ["release_year", "year"],
            "genres": ["class", "genre", "genres"],
        },
    )
    items["genres"] = items["genres"].map(lambda s: "|".join(str(s).split()))
    return RawData(ratings, users, items, p, "recbole")


def detect_format(directory: str) -> str:
    """Return 'grouplens-100k', 'grouplens-1m' or 'recbole' from the files in ``directory``."""
    if not os.path.isdir(directory):
        raise DataFormatError(directory, "data directory not found")
    files = set(os.listdir(directory))
    if {"u.data", "u.user", "u.item"} <= files:
        return "grouplens-100k"
    if {"ratings.dat", "users.dat", "movies.dat"} <= files:
        return "grouplens-1m"
    for layout, needed in (
        ("ml-100k", ("u.data", "u.user", "u.item")),
        ("ml-1m", ("ratings.dat", "users.dat", "movies.dat")),
    ):
        have = [f for f in needed if f in files]
        if have:  # a partial GroupLens layout: name the missing file rather than the layout
            missing = [f for f in needed if f not in files]
            raise DataFormatError(
                os.path.join(directory, missing[0]),
                f"file not found (the {layout} layout needs {', '.join(needed)}; "
                f"found {', '.join(have)})",
            )
    if any(f.endswith(".inter") for f in files):
        return "recbole"
    raise DataFormatError(
        directory,
        "no MovieLens files found: expected u.data/u.user/u.item (ml-100k), "
        "ratings.dat/users.dat/movies.dat (ml-1m) or RecBole atomic files (*.inter/*.user/*.item); "
        f"found {sorted(files)[:10]}",
    )


def read_any(directory: str) -> RawData:
    """Read whatever MovieLens layout ``directory`` holds (see :func:`detect_format`)."""
    fmt = detect_format(directory)
    return {
        "grouplens-100k": read_grouplens_100k,
        "grouplens-1m": read_grouplens_1m,
        "recbole": read_recbole,
    }[fmt](directory)


_YEAR_RE = re.compile(r"^\d{4}$")


def is_year(value: str) -> bool:
    """True for a 4-digit year string."""
    return bool(_YEAR_RE.match(str(value).strip()))


__all__ = [
    "DataFormatError",
    "RawData",
    "read_delimited",
    "read_grouplens_100k",
    "read_grouplens_1m",
    "read_recbole",
    "read_any",
    "detect_format",
    "is_year",
    "ML100K_GENRES",
    "ML1M_OCCUPATIONS",
]
