"""Meta-training tasks drawn afresh every epoch from the training ratings (the ``train_tasks``
modes), and the ratings each mode's features and item tables are fitted on."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from metarec import data as mdata

# the largest task each protocol makes, for tasks drawn from every training rating
TASK_SIZES = {
    "melu": {"max_ratings": 100, "n_query": 10},
    "time": {"max_ratings": 20, "n_query": 5},
}
CROSSFIT = "crossfit"
# the same as "resample" and "crossfit" with tasks shaped as the "time" protocol's: the query a
# window of consecutive ratings in time, the support the ratings just before it
# (``sample_user_sets(chronological=True)``)
CHRONO = ("resample_chrono", "crossfit_chrono")
TRAIN_TASKS = ("resample", "resample_support", CROSSFIT, "fixed", *CHRONO)
CROSSFITS = (CROSSFIT, CHRONO[1])  # the modes whose epochs cycle through folds
# the PRNG stream of the held-out query sets (epochs use 1, 2, ...); cross-fitting's fold f
# uses HELD_OUT_STREAM + f, so its fold 0 is resample_support's held-out sets; the
# chronological folds use CHRONO_STREAM + f
HELD_OUT_STREAM = 10**6
CHRONO_STREAM = 2 * 10**6


def training_draws(ratings, cfg, seed: int) -> dict:
    """The meta-training fields of :class:`SeedData` for tasks drawn from ``ratings``:
    ``draws`` (mode -> epoch -> UserSets), ``table_ratings``, ``fold_ratings`` (cross-fitting
    mode -> its folds' ratings) and ``n_task_users``. Every mode draws one task per user with
    enough ratings, afresh each epoch (PRNG stream ``[seed, epoch]``); "resample_support" always
    queries each user's one held-out set; "crossfit" queries fold
    ``(epoch - 1) % cfg.crossfit_folds``'s held-out sets (fold 0 is resample_support's, the
    others independent draws), whose ratings its epoch's features and tables are fitted without;
    the ``CHRONO`` modes are "resample" and "crossfit" with chronological tasks and held-out
    windows."""
    pool = mdata.rating_pool(ratings, min_ratings=cfg.task_min_support + 1)
    sizes = TASK_SIZES[cfg.protocol]

    def held_out(stream: int, chronological: bool) -> list:
        return [
            mdata.hold_out_queries(
                pool,
                np.random.default_rng([seed, stream + f]),
                n_query=sizes["n_query"],
                min_support=cfg.task_min_support,
                chronological=chronological,
            )
            for f in range(cfg.crossfit_folds)
        ]

    held, held_chrono = held_out(HELD_OUT_STREAM, False), held_out(CHRONO_STREAM, True)

    def make_draw(query_of: Callable, chronological: bool = False) -> Callable:
        def draw(epoch: int) -> mdata.UserSets:
            return mdata.sample_user_sets(
                pool,
                np.random.default_rng([seed, epoch]),
                min_support=cfg.task_min_support,
                fixed_query=query_of(epoch),
                chronological=chronological,
                **sizes,
            )

        return draw

    folds = [mdata.drop_held_out(ratings, pool, h) for h in held]
    folds_chrono = [mdata.drop_held_out(ratings, pool, h) for h in held_chrono]
    return {
        "draws": {
            "resample": make_draw(lambda e: None),
            "resample_support": make_draw(lambda e: held[0]),
            CROSSFIT: make_draw(lambda e: held[(e - 1) % len(held)]),
            "resample_chrono": make_draw(lambda e: None, True),
            "crossfit_chrono": make_draw(lambda e: held_chrono[(e - 1) % len(held_chrono)], True),
        },
        "table_ratings": {
            "resample": ratings,
            "fixed": ratings,
            "resample_support": folds[0],
            CROSSFIT: folds[0],
            "resample_chrono": ratings,
            "crossfit_chrono": folds_chrono[0],
        },
        "fold_ratings": {CROSSFIT: folds, "crossfit_chrono": folds_chrono},
        "n_task_users": pool.n_users,
    }
