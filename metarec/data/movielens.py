"""Typed, cleaned MovieLens: raw frames -> :func:`clean` -> :class:`RatingsData`.

Cleaning rules (each count is logged and kept in ``RatingsData.report``; nothing is dropped
silently):

* fatal (raise :class:`DataFormatError` naming file, line, field): an id, rating or timestamp that
  is not a number (e.g. ``'four'``), a duplicated user or item id in the user/item file;
* dropped and counted: ratings outside the scale (``ratings_out_of_scale``), ratings of users or
  items absent from the user/item files (``ratings_unknown_user`` / ``ratings_unknown_item``),
  duplicate (user, item) pairs — the latest by timestamp is kept (``ratings_duplicate``);
* repaired and counted: a missing or non-numeric release year (ml-100k really has ``'V'`` and
  ``'unkonwn'``) becomes ``'unknown'`` (``items_unknown_year``); a missing/non-numeric age becomes
  -1 (``users_unknown_age``); missing gender/occupation/zip become ``'unknown'``.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd

from metarec.data import fetch, readers
from metarec.data.readers import DataFormatError, RawData

log = logging.getLogger("metarec.data")


@dataclasses.dataclass(frozen=True)
class RatingsData:
    """A cleaned MovieLens dataset.

    ratings: user_id int64, item_id int64, rating float32, timestamp int64
             (sorted by user, time, item)
    users:   user_id int64, age int64 (-1 unknown), gender, occupation, zip_code (str)
    items:   item_id int64, title str, year str ('1995' or 'unknown'), genres tuple[str, ...]
    """

    name: str
    ratings: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    genres: tuple[str, ...]
    rating_scale: tuple[float, float]
    report: dict[str, int]
    source: str
    format: str


def _numeric(frame: pd.DataFrame, col: str, path: str, integer: bool) -> pd.Series:
    """Parse a string column as numbers; the first bad value raises naming file, line and field."""
    s = frame[col].astype(str).str.strip()
    vals = pd.to_numeric(s, errors="coerce")
    bad = vals.isna().to_numpy().copy()
    if integer:
        as_float = vals.fillna(0).to_numpy(float)
        # not a whole number, or beyond int64 (which would wrap around silently)
        with np.errstate(invalid="ignore"):  # inf % 1 is NaN: flagged as bad below
            bad |= ~np.isclose(as_float % 1, 0) | (np.abs(as_float) >= 2.0**63)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        kind = "an integer (within int64)" if integer else "a number"
        raise DataFormatError(
            path,
            f"expected {kind}, got {frame[col].iat[i]!r} ({int(bad.sum())} bad rows in all)",
            line=int(frame["_line"].iat[i]),
            field=col,
        )
    return vals.astype(np.int64) if integer else vals.astype(np.float32)


def _warn_dropped(frame: pd.DataFrame, bad: pd.Series, path: str, field: str, what: str) -> None:
    """Log (warning) how many rows are dropped and the file, line and value of the first one."""
    n = int(bad.sum())
    if n:
        lines = frame["_line"].to_numpy()
        i = int(np.flatnonzero(bad.to_numpy())[np.argmin(lines[bad.to_numpy()])])
        log.warning(
            "%s: dropped %d rating(s) %s (first: line %d, field '%s' = %s)",
            path,
            n,
            what,
            int(lines[i]),
            field,
            frame[field].to_numpy()[i],
        )


def clean(raw: RawData, name: str, rating_scale: tuple[float, float] = (1.0, 5.0)) -> RatingsData:
    """Type and clean raw frames (see module docstring for the rules)."""
    report: dict[str, int] = {}
    p = raw.paths

    for what, frame in (("users", raw.users), ("items", raw.items), ("ratings", raw.ratings)):
        if len(frame) == 0:
            raise DataFormatError(p[what], f"no {what}: the file has no data lines")
    users = raw.users.copy()
    users["user_id"] = _numeric(users, "user_id", p["users"], integer=True)
    dup = users["user_id"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataFormatError(
            p["users"],
            f"duplicate user id {users['user_id'].iat[i]}",
            line=int(users["_line"].iat[i]),
            field="user_id",
        )
    age = pd.to_numeric(users["age"].astype(str).str.strip(), errors="coerce")
    report["users_unknown_age"] = int(age.isna().sum())
    users["age"] = age.fillna(-1).astype(np.int64)
    for col in ("gender", "occupation", "zip_code"):
        v = users[col].astype(str).str.strip()
        missing = v.eq("") | v.str.lower().isin(["nan", "unknown"])
        report[f"users_missing_{col}"] = int(missing.sum())
        users[col] = v.where(~missing, "unknown")

    items = raw.items.copy()
    items["item_id"] = _numeric(items, "item_id", p["items"], integer=True)
    dup = items["item_id"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataFormatError(
            p["items"],
            f"duplicate item id {items['item_id'].iat[i]}",
            line=int(items["_line"].iat[i]),
            field="item_id",
        )
    year = items["year"].astype(str).str.strip()
    ok = year.map(readers.is_year)
    report["items_unknown_year"] = int((~ok).sum())
    bad_examples = sorted(set(year[~ok]))[:5]
    if bad_examples:
        log.info(
            "%s: %d items with missing/non-numeric year %s -> 'unknown'",
            p["items"],
            int((~ok).sum()),
            bad_examples,
        )
    items["year"] = year.where(ok, "unknown")
    items["genres"] = items["genres"].map(lambda g: tuple(x for x in str(g).split("|") if x))
    items["title"] = items["title"].astype(str)
    genres = sorted({g for gs in items["genres"] for g in gs})
    if raw.format == "grouplens-100k":
        genres = list(readers.ML100K_GENRES)

    ratings = raw.ratings.copy()
    n_read = len(ratings)
    for col in ("user_id", "item_id", "timestamp"):
        ratings[col] = _numeric(ratings, col, p["ratings"], integer=True)
    ratings["rating"] = _numeric(ratings, "rating", p["ratings"], integer=False)
    lo, hi = rating_scale
    out = (ratings["rating"] < lo) | (ratings["rating"] > hi)
    report["ratings_read"] = n_read
    report["ratings_out_of_scale"] = int(out.sum())
    _warn_dropped(
        ratings, out, p["ratings"], "rating", f"outside the rating scale [{lo:g}, {hi:g}]"
    )
    ratings = ratings[~out]
    unknown_user = ~ratings["user_id"].isin(users["user_id"])
    report["ratings_unknown_user"] = int(unknown_user.sum())
    _warn_dropped(
        ratings, unknown_user, p["ratings"], "user_id", f"with a user id absent from {p['users']}"
    )
    unknown_item = ~ratings["item_id"].isin(items["item_id"]) & ~unknown_user
    report["ratings_unknown_item"] = int(unknown_item.sum())
    _warn_dropped(
        ratings, unknown_item, p["ratings"], "item_id", f"with an item id absent from {p['items']}"
    )
    ratings = ratings[~unknown_user & ~unknown_item]
    ratings = ratings.sort_values(["user_id", "item_id", "timestamp", "_line"], kind="stable")
    dup = ratings.duplicated(["user_id", "item_id"], keep="last")
    report["ratings_duplicate"] = int(dup.sum())
    _warn_dropped(
        ratings,
        dup,
        p["ratings"],
        "item_id",
        "repeating an earlier (user, item) pair (the latest kept)",
    )
    ratings = ratings[~dup]
    ratings = ratings.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(
        drop=True
    )
    ratings = ratings[["user_id", "item_id", "rating", "timestamp"]]
    report["ratings_kept"] = len(ratings)
    for k, v in report.items():
        if v and k not in ("ratings_read", "ratings_kept"):
            log.info("%s: %s = %d", name, k, v)
    log.info("%s: kept %d of %d ratings", name, len(ratings), n_read)

    return RatingsData(
        name=name,
        ratings=ratings,
        users=users.drop(columns="_line").reset_index(drop=True),
        items=items.drop(columns="_line").reset_index(drop=True),
        genres=tuple(genres),
        rating_scale=(float(lo), float(hi)),
        report=report,
        source=str(p["ratings"]),
        format=raw.format,
    )


def data_checksum(data: RatingsData) -> str:
    """SHA-256 of the ratings file the data came from (recorded with results)."""
    return fetch.file_digest(data.source)
