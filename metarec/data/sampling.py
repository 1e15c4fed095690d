"""Training tasks drawn afresh every epoch from every training rating (task augmentation).

The scenario sets of :mod:`metarec.data.scenarios` give each user ONE fixed support/query split and
keep only users with 13..100 ratings, so a meta-learner trained on them never sees the ratings of
heavy raters beyond the first split, nor light raters at all. A :class:`RatingPool` keeps every
training rating grouped by user; :func:`sample_user_sets` draws one task per user for an epoch:

* a user with more than ``max_ratings`` ratings contributes a fresh random subset of
  ``max_ratings`` of them (the protocol's largest task), so heavy raters are subsampled, not cut;
* the subset is permuted; the last ``min(n_query, n - min_support)`` ratings are the query set and
  the rest the support set, so light raters (down to ``min_support + 1`` ratings) still make a task;
* the draw depends only on the generator passed in (seed it by ``(seed, epoch)`` for resumable,
  reproducible training);
* with ``fixed_query`` (:func:`hold_out_queries`) each user's query set is held out once and only
  the support set is drawn afresh — for models whose item side is fitted beforehand on the other
  ratings (:func:`drop_held_out`).

The output is a :class:`~metarec.data.scenarios.UserSets` with fixed widths (support
``max_ratings - n_query``, query ``n_query``), which the feature encoder turns into tasks as usual.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd

from metarec.data.scenarios import UserSets, padded_arrays

log = logging.getLogger("metarec.data")


@dataclasses.dataclass(frozen=True)
class RatingPool:
    """Every rating of some users, grouped by user (host numpy).

    ``user_id [U]``; user ``u``'s ratings are ``item/rating/time[start[u] : start[u] + count[u]]``,
    ordered by item id (so a draw does not depend on the frame's row order)."""

    user_id: np.ndarray
    start: np.ndarray
    count: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    time: np.ndarray

    @property
    def n_users(self) -> int:
        return int(self.user_id.shape[0])

    @property
    def n_ratings(self) -> int:
        return int(self.count.sum())


def rating_pool(frame: pd.DataFrame, min_ratings: int = 4) -> RatingPool:
    """Group ``frame`` (columns user_id, item_id, rating, timestamp) by user; users with fewer than
    ``min_ratings`` ratings cannot make a task and are left out (their count is logged)."""
    f = frame.sort_values(["user_id", "item_id"], kind="stable")
    users, start, count = np.unique(f["user_id"].to_numpy(), return_index=True, return_counts=True)
    keep = count >= min_ratings
    if (~keep).any():
        log.info(
            "rating pool: %d user(s) with fewer than %d ratings (%d ratings) make no task",
            int((~keep).sum()),
            min_ratings,
            int(count[~keep].sum()),
        )
    return RatingPool(
        user_id=users[keep].astype(np.int64),
        start=start[keep].astype(np.int64),
        count=count[keep].astype(np.int64),
        item=f["item_id"].to_numpy().astype(np.int64),
        rating=f["rating"].to_numpy().astype(np.float32),
        time=f["timestamp"].to_numpy().astype(np.int64),
    )


def time_order(pool: RatingPool, u: int) -> np.ndarray:
    """Pool rows of user ``u`` from earliest to latest (ties: by item id)."""
    rows = pool.start[u] + np.arange(int(pool.count[u]))
    return rows[np.argsort(pool.time[rows], kind="stable")]


def _window(n: int, rng: np.random.Generator, n_query: int, min_support: int) -> tuple[int, int]:
    """``(first, length)`` of a chronological query window among ``n`` time-ordered ratings:
    ``min(n_query, n - min_support)`` consecutive ratings with at least ``min_support`` before
    them, placed uniformly at random."""
    n_q = min(n_query, n - min_support)
    return int(rng.integers(min_support, n - n_q + 1)), n_q


def hold_out_queries(
    pool: RatingPool,
    rng: np.random.Generator,
    *,
    n_query: int = 10,
    min_support: int = 3,
    chronological: bool = False,
) -> np.ndarray:
    """``bool [n_ratings]``: for every pool user, ``min(n_query, count - min_support)`` random
    ratings held out as that user's fixed query set (see :func:`sample_user_sets`); with
    ``chronological`` consecutive ones in time, at least ``min_support`` ratings after the
    user's first (a query that follows its support in time, as the "time" protocol's does)."""
    held = np.zeros(pool.item.shape[0], bool)
    for u in range(pool.n_users):
        n = int(pool.count[u])
        if chronological:
            first, n_q = _window(n, rng, n_query, min_support)
            held[time_order(pool, u)[first : first + n_q]] = True
        else:
            held[pool.start[u] + rng.permutation(n)[: min(n_query, n - min_support)]] = True
    return held


def sample_user_sets(
    pool: RatingPool,
    rng: np.random.Generator,
    *,
    max_ratings: int = 100,
    n_query: int = 10,
    min_support: int = 3,
    fixed_query: np.ndarray | None = None,
    chronological: bool = False,
) -> UserSets:
    """One task per pool user, drawn with ``rng`` (see the module docstring).

    ``fixed_query`` (from :func:`hold_out_queries`): every user's query set is always its held-out
    ratings and only the support set is drawn afresh (from the others, at most
    ``max_ratings - n_query``). This is for models whose item side is fitted beforehand on the
    ratings outside those query sets: a training task's query ratings then stay unseen by that fit,
    as a new user's are.

    ``chronological``: tasks shaped as the "time" protocol's (support = a user's ratings just
    before the query in time, query = the next ones). The query is a window of
    ``min(n_query, count - min_support)`` consecutive ratings in time, placed at random with at
    least ``min_support`` ratings before it (or ``fixed_query``'s, held out chronologically), and
    the support the at most ``max_ratings - n_query`` ratings right before it, in time order.
    Every rating of a heavy rater can still be in some epoch's task."""
    if n_query < 1 or min_support < 1 or max_ratings < n_query + min_support:
        raise ValueError(
            f"need n_query >= 1, min_support >= 1 and max_ratings >= n_query + min_support; got "
            f"max_ratings={max_ratings}, n_query={n_query}, min_support={min_support}"
        )
    t, s_width = pool.n_users, max_ratings - n_query
    out = padded_arrays(pool.user_id.copy(), s_width, n_query)
    for u in range(t):
        n = int(pool.count[u])
        if chronological:
            order = time_order(pool, u)
            if fixed_query is None:
                first, n_q = _window(n, rng, n_query, min_support)
            else:
                at = np.flatnonzero(fixed_query[order])
                first, n_q = int(at[0]), len(at)
                if at[-1] - first + 1 != n_q:
                    raise ValueError(
                        f"user {int(pool.user_id[u])}: chronological tasks need a held-out query "
                        "set of consecutive ratings in time (hold_out_queries(chronological=True))"
                    )
            sup, qry = order[max(0, first - s_width) : first], order[first : first + n_q]
        elif fixed_query is None:
            m = min(n, max_ratings)
            rows = pool.start[u] + rng.permutation(n)[:m]
            n_q = min(n_query, m - min_support)
            sup, qry = rows[: m - n_q], rows[m - n_q :]
        else:
            rows = pool.start[u] + np.arange(n)
            held = fixed_query[rows]
            sup = rng.permutation(rows[~held])[:s_width]
            qry = rng.permutation(rows[held])
        for prefix, sel in (("support", sup), ("query", qry)):
            k = len(sel)
            out[f"{prefix}_item"][u, :k] = pool.item[sel]
            out[f"{prefix}_rating"][u, :k] = pool.rating[sel]
            out[f"{prefix}_mask"][u, :k] = 1.0
            out[f"{prefix}_time"][u, :k] = pool.time[sel]
    return UserSets(**out)


def drop_pairs(frame: pd.DataFrame, users, items) -> pd.DataFrame:
    """``frame`` without the ratings of the (user, item) pairs ``zip(users, items)``."""
    held = pd.MultiIndex.from_arrays([np.asarray(users), np.asarray(items)])
    key = pd.MultiIndex.from_frame(frame[["user_id", "item_id"]])
    return frame[~key.isin(held)].reset_index(drop=True)


def drop_query_ratings(frame: pd.DataFrame, sets: UserSets) -> pd.DataFrame:
    """``frame`` without the (user, item) pairs of ``sets``' query sets: the training ratings that
    remain when those users' query ratings are held out for selection."""
    rows = sets.query_mask > 0
    return drop_pairs(frame, np.repeat(sets.user_id, rows.sum(1)), sets.query_item[rows])


def drop_held_out(frame: pd.DataFrame, pool: RatingPool, held: np.ndarray) -> pd.DataFrame:
    """``frame`` without the pool ratings marked by ``held`` (:func:`hold_out_queries`)."""
    users = np.repeat(pool.user_id, pool.count)
    rows = np.concatenate([s + np.arange(c) for s, c in zip(pool.start, pool.count)])
    sel = rows[held[rows]]
    return drop_pairs(frame, users[held[rows]], pool.item[sel])


def hold_out_items(
    frame: pd.DataFrame,
    fraction: float,
    rng: np.random.Generator,
    *,
    newest_by: pd.Series | None = None,
    whole_years: bool = False,
) -> np.ndarray:
    """Sorted ids of a ``fraction`` of the items rated in ``frame`` (at least one): items that
    selection treats as new by removing every rating of them from training. A random fraction,
    or with ``newest_by`` (item id -> release year; missing or non-numeric = oldest) the newest
    items, ties broken at random, as the new items of the cold-start protocols are the newest.

    ``whole_years=True`` (with ``newest_by``) holds out release years, not items: every item of
    the newest year, then of each next-newest year while the items held out stay at most a
    ``fraction`` of them, so no held-out item shares its year with a kept one, as the cold-start
    protocols' new items (every release year from a cutoff on) share none with known items."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if whole_years and newest_by is None:
        raise ValueError("whole_years=True needs the items' release years (newest_by)")
    items = np.unique(frame["item_id"].to_numpy())
    n = max(1, int(round(fraction * len(items))))
    if newest_by is None:
        return np.sort(rng.choice(items, n, replace=False))
    year = pd.to_numeric(newest_by.reindex(items), errors="coerce").fillna(-np.inf).to_numpy()
    if whole_years:
        years, counts = np.unique(year[np.isfinite(year)], return_counts=True)
        if len(years) < 2:
            raise ValueError(
                "holding out whole release years needs at least two numeric years among the "
                f"rated items, got {len(years)}"
            )
        held = np.cumsum(counts[::-1])  # items held out with the newest 1, 2, ... years
        n_years = min(len(years) - 1, max(1, int(np.sum(held <= n))))  # one year stays known
        return np.sort(items[year >= years[::-1][n_years - 1]])
    shuffled = rng.permutation(len(items))  # the tie-break
    order = shuffled[np.argsort(-year[shuffled], kind="stable")]
    return np.sort(items[order[:n]])


def _compact(item, rating, time, keep, width: int):
    """Per row, the kept entries moved to the front (order kept), padded/cut to ``width``."""
    order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
    k = np.take_along_axis(keep, order, 1)

    def take(a):
        return np.where(k, np.take_along_axis(a, order, 1), 0).astype(a.dtype)

    return take(item), take(rating), k.astype(np.float32), take(time)


def split_new_items(
    sets: UserSets, items, *, n_query: int, min_query: int = 3
) -> tuple[UserSets, UserSets]:
    """``(known, new)``: ``sets`` seen with ``items`` as new items (nobody's ratings of them
    trained on, see :func:`hold_out_items`).

    ``known`` is ``sets`` without the ratings of ``items`` (users left with no support or no
    query rating are dropped). ``new`` holds the users with at least ``min_query`` ratings of
    ``items`` (support or query): the support set is ``known``'s, the query set up to ``n_query``
    of those ratings, so a model adapts on known items and is scored on new ones."""
    items = np.asarray(items)
    s_new = np.isin(sets.support_item, items) & (sets.support_mask > 0)
    q_new = np.isin(sets.query_item, items) & (sets.query_mask > 0)
    s_keep, q_keep = (sets.support_mask > 0) & ~s_new, (sets.query_mask > 0) & ~q_new
    sup = _compact(
        sets.support_item,
        sets.support_rating,
        sets.support_time,
        s_keep,
        sets.support_item.shape[1],
    )
    qry = _compact(
        sets.query_item, sets.query_rating, sets.query_time, q_keep, sets.query_item.shape[1]
    )
    fields = ("item", "rating", "mask", "time")
    known = UserSets(
        user_id=sets.user_id,
        **{f"support_{f}": a for f, a in zip(fields, sup)},
        **{f"query_{f}": a for f, a in zip(fields, qry)},
    )
    rated = [
        np.concatenate([getattr(sets, f"support_{f}"), getattr(sets, f"query_{f}")], axis=1)
        for f in ("item", "rating", "time")
    ]
    new_q = _compact(*rated, np.concatenate([s_new, q_new], axis=1), n_query)
    has_known = (known.support_mask.sum(1) > 0) & (known.query_mask.sum(1) > 0)
    is_new = has_known & ((s_new.sum(1) + q_new.sum(1)) >= min_query)
    new = dataclasses.replace(known, **{f"query_{f}": a for f, a in zip(fields, new_q)}).select(
        is_new
    )
    log.info(
        "new-item validation: %d items held out; %d of %d users keep known support and query "
        "sets, %d users (%d ratings) are scored on new items",
        len(items),
        int(has_known.sum()),
        sets.n_users,
        new.n_users,
        int(new.query_mask.sum()),
    )
    return known.select(has_known), new
