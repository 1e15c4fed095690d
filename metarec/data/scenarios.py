"""Cold-start scenarios (PROTOCOL.md): "melu" (MeLU's split, seeded and with warm users held out)
and "time" (users split by the time of their first rating, MAMO-style).

The output is a dict of :class:`UserSets` — padded host arrays of each user's support and query
ratings (raw ids). :mod:`metarec.data.encode` turns them into model inputs; baselines use them as
is.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd

from metarec.data.movielens import RatingsData

log = logging.getLogger("metarec.data")

SCENARIOS = ("warm_test", "user_cold", "item_cold", "user_item_cold")
YEAR_CUTOFF = {"ml-100k": 1997, "ml-1m": 1998}
PROTOCOLS = ("melu", "time")


@dataclasses.dataclass
class UserSets:
    """Padded per-user support/query sets (host numpy). Padding: item 0, rating 0, mask 0.

    user_id [T] int64; support_item/support_rating/support_mask [T, S]; query_* [T, Q];
    support_time/query_time [T, *] int64 timestamps.
    """

    user_id: np.ndarray
    support_item: np.ndarray
    support_rating: np.ndarray
    support_mask: np.ndarray
    support_time: np.ndarray
    query_item: np.ndarray
    query_rating: np.ndarray
    query_mask: np.ndarray
    query_time: np.ndarray

    @property
    def n_users(self) -> int:
        return int(self.user_id.shape[0])

    @property
    def n_ratings(self) -> int:
        return int(self.support_mask.sum() + self.query_mask.sum())

    def select(self, idx) -> UserSets:
        """The users at positions ``idx``."""
        return UserSets(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})

    def concat(self, other: UserSets) -> UserSets:
        """The users of ``self`` then those of ``other`` (same widths)."""
        return UserSets(
            **{
                f.name: np.concatenate([getattr(self, f.name), getattr(other, f.name)])
                for f in dataclasses.fields(self)
            }
        )

    def ratings(self, parts=("support", "query")) -> pd.DataFrame:
        """The ratings of ``parts`` as a ratings frame (``user_id``, ``item_id``, ``rating``,
        ``timestamp``), user by user, support first: what :func:`protocol_sets` builds sets
        from."""
        frames = []
        for prefix in parts:
            m = getattr(self, f"{prefix}_mask") > 0
            frames.append(
                pd.DataFrame(
                    {
                        "user_id": np.repeat(self.user_id, m.sum(1)),
                        "item_id": getattr(self, f"{prefix}_item")[m],
                        "rating": getattr(self, f"{prefix}_rating")[m],
                        "timestamp": getattr(self, f"{prefix}_time")[m],
                        "_order": np.repeat(np.arange(self.n_users), m.sum(1)),
                    }
                )
            )
        frame = pd.concat(frames, ignore_index=True).sort_values("_order", kind="stable")
        return frame.drop(columns="_order").reset_index(drop=True)

    def pad_support(self, size: int) -> UserSets:
        """Pad (never truncate) the support axis to ``size`` so batches share one static shape."""
        s = self.support_item.shape[1]
        if size < s:
            raise ValueError(f"cannot pad support sets of size {s} down to {size}")
        pad = ((0, 0), (0, size - s))
        return dataclasses.replace(
            self,
            support_item=np.pad(self.support_item, pad),
            support_rating=np.pad(self.support_rating, pad),
            support_mask=np.pad(self.support_mask, pad),
            support_time=np.pad(self.support_time, pad),
        )


def padded_arrays(user_id: np.ndarray, n_support: int, n_query: int) -> dict[str, np.ndarray]:
    """The all-padding fields of a :class:`UserSets` for ``user_id`` (item 0, rating 0, mask 0),
    to be filled in place."""
    t = len(user_id)
    out = {"user_id": np.asarray(user_id, np.int64)}
    for prefix, width in (("support", n_support), ("query", n_query)):
        out[f"{prefix}_item"] = np.zeros((t, width), np.int64)
        out[f"{prefix}_rating"] = np.zeros((t, width), np.float32)
        out[f"{prefix}_mask"] = np.zeros((t, width), np.float32)
        out[f"{prefix}_time"] = np.zeros((t, width), np.int64)
    return out


def _pack(
    rows: list[tuple[int, pd.DataFrame, pd.DataFrame]], n_query: int, n_support: int | None = None
) -> UserSets:
    """Pad a list of (user_id, support_frame, query_frame) into a :class:`UserSets` whose support
    width is ``n_support`` (default: the largest support set, at least 1)."""
    s = n_support if n_support is not None else max([len(sup) for _, sup, _ in rows], default=1)
    out = padded_arrays(np.array([u for u, _, _ in rows], dtype=np.int64), s, n_query)
    for i, (_, sup, qry) in enumerate(rows):
        for prefix, frame in (("support", sup), ("query", qry)):
            n = len(frame)
            out[f"{prefix}_item"][i, :n] = frame["item_id"].to_numpy()
            out[f"{prefix}_rating"][i, :n] = frame["rating"].to_numpy()
            out[f"{prefix}_mask"][i, :n] = 1.0
            out[f"{prefix}_time"][i, :n] = frame["timestamp"].to_numpy()
    return UserSets(**out)


def new_items(data: RatingsData, year_cutoff: int | None = None) -> np.ndarray:
    """Ids of NEW items: release year >= cutoff (unknown years are existing)."""
    cutoff = YEAR_CUTOFF.get(data.name, 1997) if year_cutoff is None else year_cutoff
    years = pd.to_numeric(data.items["year"], errors="coerce")
    return np.sort(data.items.loc[years >= cutoff, "item_id"].to_numpy())


def _scenario_frames(
    data: RatingsData, new_users: np.ndarray, new_item_ids: np.ndarray
) -> dict[str, pd.DataFrame]:
    r = data.ratings
    user_new = r["user_id"].isin(new_users)
    item_new = r["item_id"].isin(new_item_ids)
    return {
        "warm": r[~user_new & ~item_new],
        "user_cold": r[user_new & ~item_new],
        "item_cold": r[~user_new & item_new],
        "user_item_cold": r[user_new & item_new],
    }


def _melu_sets(frame: pd.DataFrame, seed: int, min_r: int, max_r: int, n_query: int) -> UserSets:
    rows = []
    for uid, g in frame.groupby("user_id", sort=True):
        n = len(g)
        if n < min_r or n > max_r:
            continue
        g = g.sort_values("item_id", kind="stable")
        g = g.iloc[np.random.default_rng(seed + int(uid)).permutation(n)]
        rows.append((int(uid), g.iloc[: n - n_query], g.iloc[n - n_query :]))
    return _pack(rows, n_query)


def _time_sets(frame: pd.DataFrame, n_support: int, n_query: int) -> UserSets:
    rows = []
    need = n_support + n_query
    for uid, g in frame.groupby("user_id", sort=True):
        if len(g) < need:
            continue
        g = g.sort_values(["timestamp", "item_id"], kind="stable").iloc[:need]
        rows.append((int(uid), g.iloc[:n_support], g.iloc[n_support:]))
    return _pack(rows, n_query, n_support)


@dataclasses.dataclass
class Split:
    """All scenario sets of one seed, plus what training may use.

    sets: "warm_train", "warm_test", "user_cold", "item_cold", "user_item_cold" -> UserSets
    train_ratings: every rating training may see (existing users minus warm_test users, on existing
      items) — for baselines such as MF/kNN and for vocabularies.
    new_users / new_items: the id arrays that define the scenarios.
    """

    protocol: str
    seed: int
    sets: dict[str, UserSets]
    train_ratings: pd.DataFrame
    new_users: np.ndarray
    new_items: np.ndarray

    def table(self) -> pd.DataFrame:
        """Per-scenario user and rating counts."""
        return pd.DataFrame(
            [
                {
                    "scenario": k,
                    "users": v.n_users,
                    "ratings": v.n_ratings,
                    "support_mean": float(v.support_mask.sum(1).mean()) if v.n_users else 0.0,
                    "query_size": v.query_item.shape[1],
                }
                for k, v in self.sets.items()
            ]
        )


def protocol_sets(
    frame: pd.DataFrame,
    protocol: str,
    seed: int,
    *,
    min_ratings: int = 13,
    max_ratings: int = 100,
    n_query: int | None = None,
    n_support: int = 15,
) -> UserSets:
    """One scenario's support/query sets from ``frame`` (its ratings), built by ``protocol``'s
    rule (see :func:`make_split`); for stand-ins that must be built as a scenario is."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    if protocol == "melu":
        return _melu_sets(frame, seed, min_ratings, max_ratings, 10 if n_query is None else n_query)
    return _time_sets(frame, n_support, 5 if n_query is None else n_query)


def make_split(
    data: RatingsData,
    seed: int,
    protocol: str = "melu",
    *,
    year_cutoff: int | None = None,
    min_ratings: int = 13,
    max_ratings: int = 100,
    n_query: int | None = None,
    n_support: int = 15,
    new_user_fraction: float = 0.2,
    warm_test_fraction: float = 0.1,
) -> Split:
    """Build the cold-start scenarios of PROTOCOL.md for ``seed``.

    melu: new users drawn with ``default_rng(seed)``; per scenario users with
    ``min_ratings..max_ratings`` ratings, ordered by item id, permuted by
    ``default_rng(seed + user_id)``, the last ``n_query`` (default 10) are the query set. time: the
    last ``new_user_fraction`` of users by first-rating time are new; support = earliest
    ``n_support`` (15), query = next ``n_query`` (default 5).
    In both, ``default_rng(seed + 1)`` holds out ``warm_test_fraction`` of the warm users.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    user_ids = np.sort(data.users["user_id"].to_numpy())
    n_new = int(new_user_fraction * len(user_ids))
    if protocol == "melu":
        new_users = np.random.default_rng(seed).choice(user_ids, n_new, replace=False)
    else:
        first = data.ratings.groupby("user_id")["timestamp"].min()
        order = (
            first.reset_index()
            .sort_values(["timestamp", "user_id"], kind="stable")["user_id"]
            .to_numpy()
        )
        new_users = order[len(order) - n_new :]

    def build(f):
        return protocol_sets(
            f,
            protocol,
            seed,
            min_ratings=min_ratings,
            max_ratings=max_ratings,
            n_query=n_query,
            n_support=n_support,
        )

    new_users = np.sort(new_users)
    new_item_ids = new_items(data, year_cutoff)
    frames = _scenario_frames(data, new_users, new_item_ids)
    sets = {name: build(frame) for name, frame in frames.items()}
    warm = sets.pop("warm")
    warm_ids = np.sort(warm.user_id)
    test_ids = np.random.default_rng(seed + 1).choice(
        warm_ids, int(warm_test_fraction * len(warm_ids)), replace=False
    )
    is_test = np.isin(warm.user_id, test_ids)
    out = {"warm_train": warm.select(~is_test), "warm_test": warm.select(is_test)}
    out.update(sets)
    w = frames["warm"]
    train_ratings = w[~w["user_id"].isin(test_ids)].reset_index(drop=True)
    for name, s in out.items():
        if s.n_users == 0:
            log.warning(
                "scenario %s is empty after filtering (protocol %s, seed %d)", name, protocol, seed
            )
    return Split(protocol, seed, out, train_ratings, new_users, new_item_ids)


def split_validation(sets: UserSets, fraction: float, seed: int) -> tuple[UserSets, UserSets]:
    """Split training users into (train, validation) by ``default_rng(seed)``; for tuning and early
    stopping only on training users."""
    n = sets.n_users
    n_val = max(1, int(round(fraction * n)))
    perm = np.random.default_rng(seed).permutation(n)
    val = np.zeros(n, bool)
    val[perm[:n_val]] = True
    return sets.select(~val), sets.select(val)
