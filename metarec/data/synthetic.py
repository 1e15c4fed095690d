"""Synthetic cold-start tasks with known ground truth, in the same ``x`` format as MovieLens tasks.

Generative model (all draws from ``numpy.random.default_rng(seed)``):

* item i: latent ``v_i ~ N(0, I_d)``, bias ``b_i ~ N(0, item_bias_std^2)``, a category ("year")
  ``c_i`` in ``0..n_item_groups-1`` and ``n_genres`` binary genres ``g_i = [v_i W > 0]``;
* user u: a group ``k_u`` (exposed as the first user field, so features are informative),
  latent ``p_u = m_{k_u} + user_noise * N(0, I_d)`` around the group mean ``m_k ~ N(0, I_d)``,
  bias ``a_u ~ N(0, user_bias_std^2)``;
* true mean rating ``mu_ui = base + a_u + b_i + scale * p_u . v_i / sqrt(d)``; observed rating
  ``clip(mu_ui + noise * N(0,1), 1, 5)``.

Each user rates ``n_support + n_query`` distinct random items. The returned :class:`SyntheticTruth`
holds every latent so tests can check what a learner recovers; ``true_mean`` gives the Bayes-optimal
prediction for any (user, item).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from metarec.data.encode import FeatureSpec
from metarec.data.tasks import Examples, Task


@dataclasses.dataclass(frozen=True)
class SyntheticTruth:
    user_latent: np.ndarray  # [U, d]
    user_bias: np.ndarray  # [U]
    user_group: np.ndarray  # [U]
    item_latent: np.ndarray  # [I, d]
    item_bias: np.ndarray  # [I]
    item_group: np.ndarray  # [I]
    item_genres: np.ndarray  # [I, G]
    base: float
    scale: float
    noise: float

    def true_mean(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        d = self.user_latent.shape[1]
        dot = np.einsum(
            "...d,...d->...", self.user_latent[users], self.item_latent[items]
        ) / np.sqrt(d)
        return self.base + self.user_bias[users] + self.item_bias[items] + self.scale * dot


def make_synthetic_tasks(
    seed: int = 0,
    n_users: int = 256,
    n_items: int = 200,
    n_support: int = 20,
    n_query: int = 10,
    dim: int = 8,
    n_user_groups: int = 4,
    n_item_groups: int = 5,
    n_genres: int = 6,
    noise: float = 0.3,
    scale: float = 1.5,
    user_noise: float = 1.0,
    user_bias_std: float = 0.5,
    item_bias_std: float = 0.3,
    base: float = 3.2,
) -> tuple[Task, FeatureSpec, SyntheticTruth]:
    """Generate ``n_users`` tasks (leading axis) plus the feature spec and the ground truth."""
    if n_support + n_query > n_items:
        raise ValueError(f"n_support + n_query ({n_support + n_query}) exceeds n_items ({n_items})")
    rng = np.random.default_rng(seed)
    item_latent = rng.normal(size=(n_items, dim))
    item_bias = item_bias_std * rng.normal(size=n_items)
    item_group = rng.integers(0, n_item_groups, n_items)
    genres = (item_latent @ rng.normal(size=(dim, n_genres)) > 0).astype(np.float32)
    group_means = rng.normal(size=(n_user_groups, dim))
    user_group = rng.integers(0, n_user_groups, n_users)
    user_latent = group_means[user_group] + user_noise * rng.normal(size=(n_users, dim))
    user_bias = user_bias_std * rng.normal(size=n_users)
    truth = SyntheticTruth(
        user_latent,
        user_bias,
        user_group,
        item_latent,
        item_bias,
        item_group,
        genres,
        base,
        scale,
        noise,
    )

    n = n_support + n_query
    items = np.stack([rng.choice(n_items, n, replace=False) for _ in range(n_users)])
    users = np.repeat(np.arange(n_users)[:, None], n, axis=1)
    ratings = np.clip(
        truth.true_mean(users, items) + noise * rng.normal(size=items.shape), 1.0, 5.0
    ).astype(np.float32)
    mean = float(ratings[:, :n_support].mean())

    def examples(sl: slice) -> Examples:
        it, r = items[:, sl], ratings[:, sl]
        m = it.shape[1]
        user_fields = np.stack(
            [user_group + 1, np.ones(n_users, int), np.ones(n_users, int), np.ones(n_users, int)], 1
        )
        offset = (ratings[:, :n_support].sum(1) + 2.0 * mean) / (n_support + 2.0)
        x = {
            "user": np.repeat(user_fields[:, None, :], m, axis=1).astype(np.int32),
            "item": np.stack([item_group[it] + 1, it + 1], axis=-1).astype(np.int32),
            "genres": genres[it],
            "offset": np.repeat(offset[:, None], m, axis=1).astype(np.float32),
        }
        return Examples(x=x, y=r, mask=np.ones_like(r, dtype=np.float32))

    task = Task(
        support=examples(slice(0, n_support)),
        query=examples(slice(n_support, n)),
        user=np.arange(n_users, dtype=np.int32),
    )
    spec = FeatureSpec(
        user_vocab=(n_user_groups + 1, 2, 2, 2),
        item_vocab=(n_item_groups + 1, n_items + 1),
        n_genres=n_genres,
    )
    return task, spec, truth
