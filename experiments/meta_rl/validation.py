"""The meta-RL experiment's validation users: training users held out of every fit (the tuning
path's held-out users; :func:`experiments.meta_rl.runner.build_simulator` with ``held_out="val"``).
"""

from __future__ import annotations

import numpy as np

#: RNG stream of the validation users drawn from a seed's training users
VAL_STREAM = 17


def validation_split(train_ratings, n_val: int, seed: int, max_ratings: int):
    """``(train_ratings without the validation users, items, ratings, mask [n_val, S])``: a seeded
    draw of ``n_val`` training users held out of the simulator's and the agents' training; each
    keeps at most ``max_ratings`` of their ratings (a seeded subset; the test users' width), which
    are folded in as a test user's are."""
    users = np.sort(train_ratings["user_id"].unique())
    if len(users) <= n_val:
        raise ValueError(
            f"seed {seed}: only {len(users)} training users, --config.n_val_users={n_val}"
        )
    rng = np.random.default_rng([seed, VAL_STREAM])
    val = np.sort(rng.choice(users, n_val, replace=False))
    held = train_ratings["user_id"].isin(val).to_numpy()
    frame = train_ratings[held]
    width = int(min(max_ratings, frame.groupby("user_id").size().max()))
    items = np.zeros((n_val, width), np.int64)
    ratings = np.zeros((n_val, width), np.float32)
    mask = np.zeros((n_val, width), np.float32)
    for row, (_, g) in enumerate(frame.groupby("user_id", sort=True)):
        pick = np.sort(rng.permutation(len(g))[:width])
        n = len(pick)
        items[row, :n] = g["item_id"].to_numpy(np.int64)[pick]
        ratings[row, :n] = g["rating"].to_numpy(np.float32)[pick]
        mask[row, :n] = 1.0
    return train_ratings[~held], items, ratings, mask
