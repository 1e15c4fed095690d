"""The tuning path's stand-ins for the cold scenarios, built from training users only.

The tune stage scores a candidate on the validation users (warm: their support ratings are
training ratings, like warm_test's users) and, optionally, on two more sets that mirror the
other test scenarios:

* new items (``cfg.val_new_items``): a seeded fraction of the items loses every training rating,
  so they are out of vocabulary as a new item is. The stand-in for item_cold and user_item_cold
  is built from the training users' ratings of those items by the protocol's own rule, as those
  scenarios are built from the ratings of new items (``cfg.val_new_support = "new"``): support
  and query are both ratings of held-out items. ``"known"`` builds the earlier stand-in instead:
  the users adapt on their other (known) ratings and are scored on the held-out items;
* cold users (``cfg.val_cold_users``): a seeded fraction of the non-validation training users
  loses every training rating, so no item table, kNN feature or baseline has seen them; they
  adapt on their support set and are scored on their query set, as user_cold's users are.

With ``cfg.val_hold_out="latest"`` the held-out items are the newest by release year and the
cold users those whose first training rating is latest, as the time protocol's new items and
new users are; the default ``"random"`` holds out seeded random fractions. With
``cfg.val_whole_years`` the held-out items are the newest whole release years instead (see
:func:`metarec.data.hold_out_items`), as both protocols' new items are every release year from a
cutoff on, so no kept item shares a held-out item's year.

With ``cfg.val_rebuild_tasks`` the validation and cold users' tasks are built again by the
protocol's rule after the item hold-out, from the ratings it leaves them, so their query sets keep
the protocol's size (as the test scenarios' users' tasks are built from known items' ratings).

With ``cfg.val_support_in_fit=False`` the validation users' support ratings leave the training
ratings too, so no rating of theirs is fitted (item tables, kNN, MF, meta-training tasks), as no
warm_test user's is; the default keeps them, and only their query ratings are held out.

With ``cfg.val_seal_seeds`` the tuning path also drops every rating that is a query rating of a
test scenario under one of those seeds (:func:`seal_split`): one tuned config serves every seed,
and another seed's training users include this seed's test users.

Evaluation (``prepare_seed(..., test=True)``) builds neither: it trains on every training rating.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pandas as pd
from absl import logging

from metarec import data as mdata

NEW_ITEM_STREAM = 10**6 + 1  # the PRNG stream of the new-item validation's items
COLD_USER_STREAM = 10**6 + 2  # the PRNG stream of the cold-user validation's users


VAL_NEW_SUPPORT = ("new", "known")  # how the new-item stand-in's support sets are built
# which items and users the stand-ins hold out: a seeded random fraction, or the newest items (by
# release year) and the latest-arriving users (by first training rating), as the time protocol's
# new items and new users are
VAL_HOLD_OUT = ("random", "latest")
# which model scores the validation and cold users: the new-item stand-in's, or one of their own
# trained on every training item (experiments/tune/pipeline.py)
VAL_NEW_MODEL = ("shared", "separate")


def validate_stand_ins(cfg) -> None:
    """One error line for a stand-in setting the tuning path cannot build."""
    for name in ("val_new_items", "val_cold_users"):
        if not 0 <= cfg.get(name, 0.0) < 1:
            raise ValueError(f"--config.{name} must be in [0, 1), got {cfg[name]}")
    if cfg.get("val_new_support", "known") not in VAL_NEW_SUPPORT:
        raise ValueError(
            f"--config.val_new_support={cfg.val_new_support!r}; allowed: "
            f"{', '.join(VAL_NEW_SUPPORT)}"
        )
    if cfg.get("val_new_model", "shared") not in VAL_NEW_MODEL:
        raise ValueError(
            f"--config.val_new_model={cfg.val_new_model!r}; allowed: {', '.join(VAL_NEW_MODEL)}"
        )
    seal = cfg.get("val_seal_seeds", ())
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in seal):
        raise ValueError(
            f"--config.val_seal_seeds must be seeds (integers >= 0), got {tuple(seal)!r}"
        )
    if cfg.val_hold_out not in VAL_HOLD_OUT:
        raise ValueError(
            f"--config.val_hold_out={cfg.val_hold_out!r}; allowed: {', '.join(VAL_HOLD_OUT)}"
        )


def seal_split(split: mdata.Split, data: mdata.RatingsData, seeds) -> mdata.Split:
    """``split`` (the tuning path's) without every rating that is a query rating of a test
    scenario under any of ``seeds``, its warm training users' tasks built again by the protocol's
    rule from the ratings they keep. The tune stage chooses one config for every seed it is
    evaluated on, and the protocol draws new and warm_test users per seed, so without this one
    seed's validation users and training ratings hold another seed's test query ratings. Those
    query sets are found from ids and times only: the rating values are blanked first, so none
    can reach the tuning path. With nothing to drop the split is returned unchanged."""
    blank = dataclasses.replace(data, ratings=data.ratings.assign(rating=np.float32(0)))
    train = split.train_ratings
    for seed in seeds:
        other = mdata.make_split(blank, int(seed), split.protocol)
        for name in mdata.SCENARIOS:
            train = mdata.drop_query_ratings(train, other.sets[name])
    n_dropped = len(split.train_ratings) - len(train)
    if not n_dropped:
        return split
    train = train.reset_index(drop=True)
    warm = mdata.protocol_sets(train, split.protocol, split.seed)
    logging.info(
        "sealed against the test scenarios of seeds %s: %d training ratings (query ratings of "
        "their test users) dropped; %d of %d warm training users keep a task",
        ",".join(str(int(t)) for t in seeds),
        n_dropped,
        warm.n_users,
        split.sets["warm_train"].n_users,
    )
    return dataclasses.replace(split, train_ratings=train, sets={**split.sets, "warm_train": warm})


def hold_out_users(train_sets: mdata.UserSets, fraction: float, seed: int, *, first_time=None):
    """``(kept, cold)``: a seeded ``fraction`` of ``train_sets``' users (at least one, and at
    least one kept) moved to ``cold``; with ``first_time`` (per user of ``train_sets``, the time
    of their first rating) the latest-arriving users, ties broken at random."""
    n = train_sets.n_users
    n_cold = min(n - 1, max(1, int(round(fraction * n))))
    perm = np.random.default_rng([seed, COLD_USER_STREAM]).permutation(n)
    if first_time is not None:
        perm = perm[np.argsort(-np.asarray(first_time, np.float64)[perm], kind="stable")]
    cold = np.zeros(n, bool)
    cold[perm[:n_cold]] = True
    return train_sets.select(~cold), train_sets.select(cold)


def tuning_sets(
    fit_ratings: pd.DataFrame,
    train_sets: mdata.UserSets,
    val_sets: mdata.UserSets,
    cfg,
    seed: int,
    n_query: int,
    item_years: pd.Series | None = None,
):
    """``(fit_ratings, train_sets, val_sets, val_new_sets, val_cold_sets)`` of the tuning path:
    the training ratings without the held-out items' and the cold users' ratings, and the two
    stand-in sets (``None`` where ``cfg`` turns them off). The held-out items leave the cold
    users' sets as they leave the validation users'; their ratings of held-out items count in
    the new-item set (as user_item_cold's users count in the test scenarios).
    ``cfg.val_hold_out="latest"`` holds out the newest items by ``item_years`` (item id ->
    release year) and the users whose first training rating is latest; ``cfg.val_whole_years``
    the newest whole release years."""
    rated = fit_ratings  # every rating the stand-ins may be built from
    latest = cfg.val_hold_out == "latest"
    by_year = latest or cfg.val_whole_years
    if by_year and item_years is None:
        raise ValueError("holding out the newest items needs the items' release years")
    val_cold_sets = None
    if cfg.get("val_cold_users", 0.0) > 0:
        first = None
        if latest:
            by_user = fit_ratings.groupby("user_id")["timestamp"].min()
            first = by_user.reindex(np.asarray(train_sets.user_id)).to_numpy()
        train_sets, val_cold_sets = hold_out_users(
            train_sets, cfg.val_cold_users, seed, first_time=first
        )
        fit_ratings = drop_users(fit_ratings, val_cold_sets, "cold-user validation's ratings")
    val_new_sets = None
    val_all = val_sets  # before the hold-out: whose tasks a rebuild starts from
    if cfg.val_new_items > 0:
        new_items = mdata.hold_out_items(
            fit_ratings,
            cfg.val_new_items,
            np.random.default_rng([seed, NEW_ITEM_STREAM]),
            newest_by=item_years if by_year else None,
            whole_years=cfg.val_whole_years,
        )
        held = fit_ratings["item_id"].isin(new_items)
        logging.info(
            "new-item validation: %d items (%d training ratings) held out of training",
            len(new_items),
            int(held.sum()),
        )
        fit_ratings = fit_ratings[~held].reset_index(drop=True)
        # every set loses its held-out-item ratings; "known" scores them after the rest
        train_sets, train_new = mdata.split_new_items(train_sets, new_items, n_query=n_query)
        val_sets, val_new = mdata.split_new_items(val_sets, new_items, n_query=n_query)
        parts = [train_new, val_new]
        if val_cold_sets is not None:
            val_cold_sets, cold_new = mdata.split_new_items(
                val_cold_sets, new_items, n_query=n_query
            )
            parts.append(cold_new)
        if cfg.get("val_new_support", "known") == "known":
            val_new_sets = functools.reduce(mdata.UserSets.concat, parts)
        else:
            frame = rated[rated["item_id"].isin(new_items)]
            val_new_sets = mdata.protocol_sets(frame, cfg.protocol, seed, n_query=n_query)
            logging.info(
                "new-item validation built as item_cold is: %d users, %d support and %d query "
                "ratings of the %d held-out items (of %d ratings of them); it replaces the "
                "known-support sets logged above",
                val_new_sets.n_users,
                int(val_new_sets.support_mask.sum()),
                int(val_new_sets.query_mask.sum()),
                len(new_items),
                len(frame),
            )
            if val_new_sets.n_users == 0:
                raise ValueError(
                    f"the new-item validation of seed {seed} is empty: no training user has "
                    f"enough ratings of the {len(new_items)} held-out items for a "
                    f"{cfg.protocol} task; raise --config.val_new_items or set "
                    "--config.val_new_support=known"
                )
        if cfg.val_rebuild_tasks:
            fit_ratings, val_sets, val_cold_sets = rebuild_tasks(
                rated, fit_ratings, val_all, val_cold_sets, new_items, cfg.protocol, seed, n_query
            )
    if not cfg.get("val_support_in_fit", True):
        fit_ratings = drop_users(fit_ratings, val_sets, "validation users' non-query ratings")
    return fit_ratings, train_sets, val_sets, val_new_sets, val_cold_sets


def drop_users(fit_ratings: pd.DataFrame, sets: mdata.UserSets, what: str) -> pd.DataFrame:
    """``fit_ratings`` without any rating of ``sets``' users, the count logged as ``what``."""
    mine = fit_ratings["user_id"].isin(np.asarray(sets.user_id))
    logging.info(
        "%d training ratings (the %s, %d users) held out of training",
        int(mine.sum()),
        what,
        sets.n_users,
    )
    return fit_ratings[~mine].reset_index(drop=True)


def rebuild_tasks(rated, fit_ratings, val_sets, val_cold_sets, new_items, protocol, seed, n_query):
    """``(fit_ratings, val_sets, val_cold_sets)`` with the validation and cold users' tasks built
    again by ``protocol``'s rule from the ratings the item hold-out left them, as the test
    scenarios are built from their users' ratings of known items: the hold-out otherwise only
    removes ratings from fixed tasks, so query sets shrink below the protocol's size.

    ``val_sets`` are the validation users' tasks before the hold-out. Their support ratings stay
    training ratings and their query ratings do not, as before: the old query ratings of kept
    items return to ``fit_ratings`` and the new ones leave it. ``rated`` (the training ratings
    before any hold-out) holds the cold users' ratings."""
    kept_q = val_sets.ratings(("query",))
    kept_q = kept_q[~kept_q["item_id"].isin(new_items)]
    fit_ratings = pd.concat([fit_ratings, kept_q], ignore_index=True)
    users = np.asarray(val_sets.user_id)
    mine = fit_ratings[fit_ratings["user_id"].isin(users)]
    rebuilt = mdata.protocol_sets(mine, protocol, seed, n_query=n_query)
    fit_ratings = mdata.drop_query_ratings(fit_ratings, rebuilt).reset_index(drop=True)
    logging.info(
        "validation users' tasks rebuilt by the %s rule after the item hold-out: %d of %d users "
        "keep a task; query sets of %.1f ratings (%.1f of kept items before)",
        protocol,
        rebuilt.n_users,
        len(users),
        float(rebuilt.query_mask.sum(1).mean()) if rebuilt.n_users else 0.0,
        len(kept_q) / max(1, len(users)),
    )
    if val_cold_sets is not None:
        cold = rated[
            rated["user_id"].isin(np.asarray(val_cold_sets.user_id))
            & ~rated["item_id"].isin(new_items)
        ]
        n_before = val_cold_sets.n_users
        val_cold_sets = mdata.protocol_sets(cold, protocol, seed, n_query=n_query)
        logging.info(
            "cold-user validation's tasks rebuilt the same way: %d of %d users keep a task",
            val_cold_sets.n_users,
            n_before,
        )
    for name, sets in (("validation", rebuilt), ("cold-user validation", val_cold_sets)):
        if sets is not None and sets.n_users == 0:
            raise ValueError(
                f"the {name} users of seed {seed} keep too few ratings after the item hold-out "
                f"for a {protocol} task; lower --config.val_new_items or set "
                "--config.val_rebuild_tasks=False"
            )
    return fit_ratings, rebuilt, val_cold_sets
