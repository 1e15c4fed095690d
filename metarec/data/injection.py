"""Profile injection (shilling) attacks: fake users with extreme ratings pushing target items.

:func:`make_injection` builds ``round(fraction x n)`` fake users, ``n`` = the distinct users of the
training ratings it is given, seeded by ``seed``. Each fake profile rates every target item at the
top of the scale (push) and ``n_filler`` filler items drawn uniformly from the other rated items:

* ``kind="random"``: each filler rating is the bottom or the top of the scale at random;
* ``kind="average"``: each filler is rated at the extreme on its item's side of the scale midpoint
  (an item rated above the midpoint on average gets the top, else the bottom): the average attack
  of Lam & Riedl (2004) pushed to the extremes, so the fake users look like real users' tastes.

Fake users get ids above every real id and demographics copied from random real users (public
features), so every encoder can read them; their ratings carry one timestamp after the last real
one. :func:`poison` appends them to a ratings frame and a users frame; the injected counts are
logged and returned (:class:`Injection`).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd

log = logging.getLogger("metarec.data")
KINDS = ("random", "average")


@dataclasses.dataclass(frozen=True)
class Injection:
    """The fake profiles: ``ratings`` (user_id, item_id, rating, timestamp), ``users`` (rows of
    the users frame), the pushed ``targets`` and the counts."""

    ratings: pd.DataFrame
    users: pd.DataFrame
    targets: np.ndarray
    n_users: int
    n_ratings: int

    def summary(self) -> dict:
        return {
            "n_users": self.n_users,
            "n_ratings": self.n_ratings,
            "targets": [int(t) for t in self.targets],
        }


def make_injection(
    ratings: pd.DataFrame,
    users: pd.DataFrame,
    *,
    fraction: float,
    n_filler: int = 50,
    n_targets: int = 5,
    kind: str = "average",
    scale: tuple[float, float] = (1.0, 5.0),
    seed: int = 0,
    min_target_ratings: int = 10,
    targets=None,
) -> Injection:
    """Fake profiles against ``ratings`` (the training ratings the attacker pollutes); see the
    module docstring. ``targets``: the pushed item ids (default ``n_targets`` drawn among the items
    with at least ``min_target_ratings`` ratings)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"injection fraction must be in (0, 1], got {fraction!r}")
    if kind not in KINDS:
        raise ValueError(f"injection kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if n_filler < 0 or n_targets < 0 or n_filler + n_targets < 1:
        raise ValueError(f"need n_filler, n_targets >= 0, one > 0; got {n_filler}, {n_targets}")
    rng = np.random.default_rng(seed)
    lo, hi = float(scale[0]), float(scale[1])
    counts = ratings.groupby("item_id")["rating"].agg(["size", "mean"])
    if targets is None:
        eligible = np.sort(counts.index[counts["size"] >= min_target_ratings].to_numpy())
        if len(eligible) < n_targets:
            raise ValueError(
                f"only {len(eligible)} items have >= {min_target_ratings} ratings; "
                f"cannot draw {n_targets} targets"
            )
        targets = rng.choice(eligible, n_targets, replace=False)
    targets = np.sort(np.asarray(targets, np.int64))
    fillers = np.setdiff1d(np.sort(counts.index.to_numpy()), targets)
    if len(fillers) < n_filler:
        raise ValueError(f"only {len(fillers)} filler items, {n_filler} per profile asked")
    n_fake = max(1, int(round(fraction * ratings["user_id"].nunique())))
    first_id = int(max(users["user_id"].max(), ratings["user_id"].max())) + 1
    ids = np.arange(first_id, first_id + n_fake, dtype=np.int64)
    item_mean = counts["mean"]
    mid = 0.5 * (lo + hi)
    rows_u, rows_i, rows_r = [], [], []
    for u in ids:
        f = np.sort(rng.choice(fillers, n_filler, replace=False))
        if kind == "random":
            r = np.where(rng.random(n_filler) < 0.5, lo, hi)
        else:
            r = np.where(item_mean.loc[f].to_numpy() >= mid, hi, lo)
        rows_u += [u] * (n_filler + len(targets))
        rows_i += list(f) + list(targets)
        rows_r += list(r) + [hi] * len(targets)
    stamp = int(ratings["timestamp"].max()) + 1 if "timestamp" in ratings else 0
    fake = pd.DataFrame(
        {
            "user_id": np.asarray(rows_u, np.int64),
            "item_id": np.asarray(rows_i, np.int64),
            "rating": np.asarray(rows_r, ratings["rating"].dtype),
            "timestamp": np.full(len(rows_u), stamp, np.int64),
        }
    )
    demo = users.iloc[rng.integers(0, len(users), n_fake)].copy()
    demo["user_id"] = ids
    inj = Injection(
        ratings=fake,
        users=demo.reset_index(drop=True),
        targets=targets,
        n_users=n_fake,
        n_ratings=len(fake),
    )
    log.info(
        "profile injection (%s): %d fake users, %d ratings, targets %s",
        kind,
        inj.n_users,
        inj.n_ratings,
        targets.tolist(),
    )
    return inj


def poison(ratings: pd.DataFrame, users: pd.DataFrame, inj: Injection):
    """``(ratings + fake ratings, users + fake users)``, columns and dtypes kept."""
    r = pd.concat([ratings, inj.ratings[ratings.columns]], ignore_index=True)
    u = pd.concat([users, inj.users[users.columns]], ignore_index=True)
    return r.astype(ratings.dtypes.to_dict()), u.astype(users.dtypes.to_dict())
