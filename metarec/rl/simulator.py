"""User simulators: per-user :class:`~metarec.rl.env.EnvParams` from MovieLens or latent users.

MovieLens (:func:`movielens_simulator`)
    1. A biased MF ``r_ui = mu + b_u + b_i + p_u . q_i`` is fitted with the baselines' trainer
       (:mod:`metarec.baselines.mf`: full-batch Adam, L2) on the *training* users' ratings only
       (:func:`fit_biased_mf`).
    2. The catalogue is the ``n_items`` most-rated items in those training ratings (ties broken by
       item id), so episodes stay small enough for a 2-core CPU.
    3. A training user's affinity is the MF's predicted rating of every catalogue item.
       A held-out (test) user's ``b_u, p_u`` are obtained by *folding in* their ratings with the
       item side frozen (closed-form ridge regression, :func:`fold_in`); the MF is never trained on
       them.
    4. Click model / dynamics: :mod:`metarec.rl.env` (``threshold`` is on the rating scale, e.g.
       3.5: an item predicted at 3.5 stars is clicked half the time by a fresh user).
       ``reward="click"`` gives 1 per click; ``reward="rating"`` gives ``predicted rating / 5`` per
       click (clipped to the rating scale).
    The recommender side gets a *simulator-independent* MF (different rank, regulariser and seed,
    fitted on the same training ratings) for the MF-greedy / bandit baselines, and item popularity
    (number of training ratings).

Synthetic (:func:`synthetic_simulator`), RecSim-style latent users
    Items have a latent vector and a primary genre; users belong to one of ``n_clusters`` taste
    clusters (interest vector = cluster centre + noise), ``affinity = center + scale * u . v``.
    With ``planted_best > 0`` every cluster additionally gets its own ``planted_best`` items with a
    boosted affinity, so *each kind of user has its own best items*: a policy that is not adapted to
    the user can only find the items that are good on average. Training "ratings" for the
    recommender-side MF are noisy rounded affinities of random items of the training users.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from metarec.baselines.common import prepare_ratings
from metarec.baselines.mf import mf_mse, train_mf
from metarec.rl import env as envlib

_DEFAULT_ENV = envlib.EnvConfig()


@dataclasses.dataclass(frozen=True)
class MFModel:
    """A fitted biased MF (host numpy arrays). ``user_index`` / ``item_index`` map raw ids to
    rows."""

    mu: float
    user_bias: np.ndarray
    item_bias: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    user_index: dict
    item_index: dict
    train_rmse: float

    def predict(
        self, user_bias: np.ndarray, user_factors: np.ndarray, item_rows: np.ndarray
    ) -> np.ndarray:
        """Predicted ratings ``[U, len(item_rows)]`` for the given user parameters."""
        return (
            self.mu
            + user_bias[:, None]
            + self.item_bias[item_rows][None, :]
            + user_factors @ self.item_factors[item_rows].T
        )


def fit_biased_mf(
    ratings: pd.DataFrame,
    rank: int = 16,
    l2: float = 0.05,
    steps: int = 400,
    lr: float = 0.05,
    seed: int = 0,
) -> MFModel:
    """Fit ``r = mu + b_u + b_i + p_u . q_i`` with the baselines' trainer
    (:func:`metarec.baselines.mf.train_mf`, ``l2_form="rated"``: full-batch Adam on MSE + ``l2``
    times the squared parameters of the rated rows, averaged over the ratings). ``ratings`` needs
    columns user_id, item_id, rating; ``mu`` is their mean."""
    for col in ("user_id", "item_id", "rating"):
        if col not in ratings.columns:
            raise ValueError(
                f"ratings frame is missing column {col!r} (has {list(ratings.columns)})"
            )
    if len(ratings) == 0:
        raise ValueError("cannot fit MF on an empty ratings frame")
    if rank < 1 or steps < 1 or lr <= 0 or l2 < 0:
        raise ValueError(f"bad MF settings rank={rank} steps={steps} lr={lr} l2={l2}")
    data = prepare_ratings(
        ratings["user_id"].to_numpy(),
        ratings["item_id"].to_numpy(),
        ratings["rating"].to_numpy(np.float32),
    )
    mu = float(np.mean(ratings["rating"].to_numpy(np.float64)))
    p, mu32, _ = train_mf(
        data.u,
        data.i,
        data.r,
        data.n_users,
        data.n_items,
        dim=rank,
        reg=l2,
        lr=lr,
        steps=steps,
        init_scale=0.1,
        key=jax.random.key(seed),
        l2_form="rated",
        mu=mu,
    )
    mse = mf_mse(p, mu32, jnp.asarray(data.u), jnp.asarray(data.i), jnp.asarray(data.r))
    return MFModel(
        mu=mu,
        user_bias=np.asarray(p["user_bias"]),
        item_bias=np.asarray(p["item_bias"]),
        user_factors=np.asarray(p["user_factors"]),
        item_factors=np.asarray(p["item_factors"]),
        user_index={int(u): k for k, u in enumerate(data.user_vocab)},
        item_index={int(v): k for k, v in enumerate(data.item_vocab)},
        train_rmse=float(np.sqrt(mse)),
    )


def fold_in(
    model: MFModel, item_rows: np.ndarray, ratings: np.ndarray, mask: np.ndarray, l2: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Fold new users into a fitted MF with the item side frozen.

    For each user solves the ridge problem ``min_{b,p} sum_j m_j (r_j - mu - b_ij - b - p.q_ij)^2
    + l2 (b^2 + |p|^2)`` in closed form. ``item_rows [U, S]`` are MF item rows (any value where
    ``mask == 0``). Returns ``(user_bias [U], user_factors [U, rank])``.

    This is the ridge problem of :func:`metarec.baselines.mf.mf_fold_in`, solved here on the host
    with numpy (LU) rather than with its jitted Cholesky solve: the two agree only up to the last
    bits, and the simulators (and their digests) are defined by these numbers.
    """
    item_rows = np.asarray(item_rows)
    mask = np.asarray(mask, np.float32)
    rows = np.where(mask > 0, item_rows, 0)
    q = model.item_factors[rows]  # [U, S, k]
    x = np.concatenate([np.ones(q.shape[:-1] + (1,), np.float32), q], -1)
    y = (np.asarray(ratings, np.float32) - model.mu - model.item_bias[rows]) * mask
    xm = x * mask[..., None]
    a = np.einsum("usk,usl->ukl", xm, x) + l2 * np.eye(x.shape[-1], dtype=np.float32)
    b = np.einsum("usk,us->uk", xm, y)
    w = np.linalg.solve(a, b[..., None])[..., 0]
    return w[:, 0].astype(np.float32), w[:, 1:].astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SimulatorData:
    """Everything an RL experiment needs about its users and catalogue.

    ``train`` / ``test``: batched :class:`EnvParams` of training and held-out users.
    ``item_ids``: raw ids of the catalogue items (row ``i`` of every ``[I]`` array).
    ``popularity [I]``: training interaction counts. ``agent_item_factors [I, k]`` and
    ``agent_item_score [I]`` (``mu + b_i`` of the recommender-side MF): simulator-independent item
    knowledge for the baselines. ``report``: fit statistics for logging.
    """

    train: envlib.EnvParams
    test: envlib.EnvParams
    item_ids: np.ndarray
    popularity: np.ndarray
    agent_item_factors: np.ndarray
    agent_item_score: np.ndarray
    report: dict[str, Any]


def _item_genres(items: pd.DataFrame, genres: tuple[str, ...], item_ids: np.ndarray) -> np.ndarray:
    gmap = {g: j for j, g in enumerate(genres)}
    by_id = dict(zip(items["item_id"].to_numpy(np.int64), items["genres"]))
    out = np.zeros((len(item_ids), max(len(genres), 1)), np.float32)
    for row, iid in enumerate(item_ids):
        for g in by_id.get(int(iid), ()):
            if g in gmap:
                out[row, gmap[g]] = 1.0
    return out


def movielens_simulator(
    train_ratings: pd.DataFrame,
    items: pd.DataFrame,
    genres: tuple[str, ...],
    test_items: np.ndarray,
    test_ratings: np.ndarray,
    test_mask: np.ndarray,
    env_config: envlib.EnvConfig = _DEFAULT_ENV,
    n_items: int = 200,
    reward: str = "click",
    rating_scale: tuple[float, float] = (1.0, 5.0),
    mf_rank: int = 16,
    mf_steps: int = 400,
    fold_in_l2: float = 1.0,
    agent_rank: int = 8,
    seed: int = 0,
    max_train_users: int | None = None,
) -> SimulatorData:
    """Build train/test user environments from MovieLens (see the module docstring).

    ``train_ratings``: the training users' ratings (columns user_id, item_id, rating).
    ``test_items / test_ratings / test_mask [U_test, S]``: the held-out users' known ratings (raw
    item ids, e.g. a scenario's support and query sets concatenated); folded into the MF, never
    trained on.
    ``max_train_users``: keep only the first N training users (sorted by id) as environments.
    """
    if reward not in ("click", "rating"):
        raise ValueError(f"reward must be 'click' or 'rating', got {reward!r}")
    if n_items < 2:
        raise ValueError(f"n_items must be >= 2, got {n_items}")
    model = fit_biased_mf(train_ratings, rank=mf_rank, steps=mf_steps, seed=seed)
    agent = fit_biased_mf(train_ratings, rank=agent_rank, l2=0.1, steps=mf_steps, seed=seed + 7919)
    counts = train_ratings.groupby("item_id").size()
    order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    item_ids = np.array([int(k) for k, _ in order[:n_items]], np.int64)
    if len(item_ids) < n_items:
        raise ValueError(
            f"only {len(item_ids)} items in the training ratings, asked for n_items={n_items}"
        )
    popularity = np.array([counts[i] for i in item_ids], np.float32)
    rows = np.array([model.item_index[int(i)] for i in item_ids])
    arows = np.array([agent.item_index[int(i)] for i in item_ids])

    train_users = np.sort(np.array(list(model.user_index.keys()), np.int64))
    if max_train_users is not None:
        train_users = train_users[:max_train_users]
    urows = np.array([model.user_index[int(u)] for u in train_users])
    aff_train = model.predict(model.user_bias[urows], model.user_factors[urows], rows)

    test_items = np.asarray(test_items, np.int64)
    test_mask = np.asarray(test_mask, np.float32)
    known = (
        np.vectorize(lambda i: model.item_index.get(int(i), -1))(test_items)
        if test_items.size
        else test_items
    )
    fmask = test_mask * (known >= 0)
    bu, pu = fold_in(model, np.maximum(known, 0), test_ratings, fmask, l2=fold_in_l2)
    aff_test = model.predict(bu, pu, rows)

    lo, hi = rating_scale

    def click_reward(aff):
        return None if reward == "click" else np.clip(aff, lo, hi) / hi

    g = _item_genres(items, genres, item_ids)
    train = envlib.make_env_params(aff_train, g, env_config, click_reward=click_reward(aff_train))
    test = envlib.make_env_params(aff_test, g, env_config, click_reward=click_reward(aff_test))
    report = {
        "mf_train_rmse": model.train_rmse,
        "agent_mf_train_rmse": agent.train_rmse,
        "n_train_users": int(len(train_users)),
        "n_test_users": int(aff_test.shape[0]),
        "n_items": int(n_items),
        "test_ratings_folded_in": int(fmask.sum()),
        "test_ratings_unknown_item": int((test_mask * (known < 0)).sum()),
    }
    return SimulatorData(
        train=train,
        test=test,
        item_ids=item_ids,
        popularity=popularity,
        agent_item_factors=agent.item_factors[arows].astype(np.float32),
        agent_item_score=(agent.mu + agent.item_bias[arows]).astype(np.float32),
        report=report,
    )


def synthetic_affinity(
    seed: int,
    n_users: int,
    n_items: int,
    n_genres: int = 6,
    latent_dim: int = 4,
    n_clusters: int = 4,
    user_noise: float = 0.3,
    center: float = 3.0,
    scale: float = 0.7,
    planted_best: int = 3,
    planted_boost: float = 2.0,
    first_user: int = 0,
):
    """Latent-user affinities ``[n_users, n_items]``, item genres ``[n_items, n_genres]`` and
    cluster labels. Items and clusters depend only on ``seed``; user ``k`` (global index
    ``first_user + k``) gets its own noise, so train and test users are disjoint draws from the
    same population."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n_items, latent_dim)) / np.sqrt(latent_dim)
    genre = rng.integers(0, n_genres, size=n_items)
    g = np.eye(n_genres, dtype=np.float32)[genre]
    centres = rng.normal(size=(n_clusters, latent_dim))
    best = (
        np.stack([rng.choice(n_items, planted_best, replace=False) for _ in range(n_clusters)])
        if planted_best
        else None
    )
    aff = np.zeros((n_users, n_items), np.float32)
    labels = np.zeros(n_users, np.int64)
    for k in range(n_users):
        urng = np.random.default_rng([seed, first_user + k])
        c = int(urng.integers(n_clusters))
        u = centres[c] + user_noise * urng.normal(size=latent_dim)
        a = center + scale * (v @ u)
        if best is not None:
            a[best[c]] += planted_boost
        aff[k] = a
        labels[k] = c
    return aff, g, labels


def synthetic_simulator(
    seed: int = 0,
    n_train_users: int = 256,
    n_test_users: int = 64,
    n_items: int = 50,
    env_config: envlib.EnvConfig = _DEFAULT_ENV,
    reward: str = "click",
    n_logged: int = 20,
    agent_rank: int = 4,
    mf_steps: int = 300,
    held_out_first: int | None = None,
    **latent,
) -> SimulatorData:
    """A :class:`SimulatorData` from :func:`synthetic_affinity` (train users ``0..n_train-1``, the
    held-out users from ``held_out_first``, default: right after them). The recommender-side MF is
    fitted on ``n_logged`` noisy rounded ratings per training user."""
    if reward not in ("click", "rating"):
        raise ValueError(f"reward must be 'click' or 'rating', got {reward!r}")
    aff_tr, g, _ = synthetic_affinity(seed, n_train_users, n_items, first_user=0, **latent)
    first = n_train_users if held_out_first is None else held_out_first
    if first < n_train_users:
        raise ValueError(f"held_out_first={first} overlaps the {n_train_users} training users")
    aff_te, _, _ = synthetic_affinity(seed, n_test_users, n_items, first_user=first, **latent)
    rng = np.random.default_rng([seed, 99])
    rows = []
    for uu in range(n_train_users):
        its = rng.choice(n_items, min(n_logged, n_items), replace=False)
        rr = np.clip(np.round(aff_tr[uu, its] + 0.5 * rng.normal(size=len(its))), 1, 5)
        rows.append(pd.DataFrame({"user_id": uu, "item_id": its, "rating": rr.astype(np.float32)}))
    logged = pd.concat(rows, ignore_index=True)
    agent = fit_biased_mf(logged, rank=agent_rank, l2=0.1, steps=mf_steps, seed=seed + 7919)
    counts = (
        logged.groupby("item_id").size().reindex(range(n_items), fill_value=0).to_numpy(np.float32)
    )
    # items never logged get the global mean and zero factors
    af = np.zeros((n_items, agent_rank), np.float32)
    ascore = np.full(n_items, agent.mu, np.float32)
    for iid, row in agent.item_index.items():
        af[iid] = agent.item_factors[row]
        ascore[iid] = agent.mu + agent.item_bias[row]
    cr = (lambda a: None) if reward == "click" else (lambda a: np.clip(a, 1, 5) / 5)
    train = envlib.make_env_params(aff_tr, g, env_config, click_reward=cr(aff_tr))
    test = envlib.make_env_params(aff_te, g, env_config, click_reward=cr(aff_te))
    report = {
        "agent_mf_train_rmse": agent.train_rmse,
        "n_train_users": n_train_users,
        "n_test_users": n_test_users,
        "n_items": n_items,
    }
    return SimulatorData(
        train=train,
        test=test,
        item_ids=np.arange(n_items),
        popularity=counts,
        agent_item_factors=af,
        agent_item_score=ascore,
        report=report,
    )
