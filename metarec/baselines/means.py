"""Mean baselines: ``global_mean``, ``user_mean`` and ``item_mean``.

* ``global_mean`` predicts the mean training rating ``mu`` for everything.
* ``user_mean`` predicts the evaluation user's support-set mean shrunk toward ``mu`` with
  ``shrinkage`` pseudo-ratings: ``(sum_s r_s + shrinkage * mu) / (n_s + shrinkage)``. With the
  default ``shrinkage=0`` it is the plain support mean; an empty support gives ``mu``.
* ``item_mean`` predicts the item's TRAINING mean shrunk toward ``mu`` with ``shrinkage``
  pseudo-ratings: ``(sum_u r_ui + shrinkage * mu) / (n_i + shrinkage)``. Items never seen in
  training get ``mu`` (the support set is deliberately not used: this baseline has no user side).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from metarec.baselines.common import Baseline, lookup, make_predict, prepare_ratings, support_mean


@flax.struct.dataclass
class MeanState:
    """Fitted mean-baseline state (``item_vocab`` / ``item_mean`` unused by the first two)."""

    mu: jax.Array
    r_min: jax.Array
    r_max: jax.Array
    item_vocab: jax.Array
    item_mean: jax.Array


def _check_shrinkage(shrinkage):
    shrinkage = float(shrinkage)
    if not shrinkage >= 0:
        raise ValueError(f"shrinkage must be >= 0, got {shrinkage}")
    return shrinkage


def fit_means(user_ids, item_ids, ratings, shrinkage: float = 0.0) -> MeanState:
    """Global mean, rating range and shrunk per-item means of the training ratings."""
    data = prepare_ratings(user_ids, item_ids, ratings)
    mu = float(np.mean(data.r, dtype=np.float64))
    sums = np.bincount(data.i, weights=data.r, minlength=data.n_items)
    counts = np.bincount(data.i, minlength=data.n_items)
    item_mean = (sums + shrinkage * mu) / (counts + shrinkage)
    return MeanState(
        mu=jnp.float32(mu),
        r_min=jnp.float32(data.r.min()),
        r_max=jnp.float32(data.r.max()),
        item_vocab=jnp.asarray(data.item_vocab),
        item_mean=jnp.asarray(item_mean, jnp.float32),
    )


def _global_core(hp, state, s_item, s_rat, s_mask, q_item, q_mask):
    return jnp.full(q_item.shape, state.mu, jnp.float32)


def _user_core(hp, state, s_item, s_rat, s_mask, q_item, q_mask):
    (shrinkage,) = hp
    m = support_mean(s_rat, s_mask, state.mu, shrinkage)
    return jnp.broadcast_to(m[:, None], q_item.shape)


def _item_core(hp, state, s_item, s_rat, s_mask, q_item, q_mask):
    idx, known = lookup(state.item_vocab, q_item)
    return jnp.where(known, state.item_mean[idx], state.mu)


def global_mean(clip: bool = True) -> Baseline:
    """Predict the training mean rating for every query."""

    def fit(user_ids, item_ids, ratings):
        return fit_means(user_ids, item_ids, ratings)

    return Baseline("global_mean", fit, make_predict(_global_core, (), clip, pad=True))


def user_mean(shrinkage: float = 0.0, clip: bool = True) -> Baseline:
    """Predict the user's support mean, shrunk toward the training mean by ``shrinkage``
    pseudo-ratings (empty support -> training mean)."""
    shrinkage = _check_shrinkage(shrinkage)

    def fit(user_ids, item_ids, ratings):
        return fit_means(user_ids, item_ids, ratings)

    return Baseline("user_mean", fit, make_predict(_user_core, (shrinkage,), clip, pad=True))


def item_mean(shrinkage: float = 5.0, clip: bool = True) -> Baseline:
    """Predict each query item's training mean, shrunk toward the global mean by ``shrinkage``
    pseudo-ratings; unseen items get the global mean."""
    shrinkage = _check_shrinkage(shrinkage)

    def fit(user_ids, item_ids, ratings):
        return fit_means(user_ids, item_ids, ratings, shrinkage)

    return Baseline("item_mean", fit, make_predict(_item_core, (), clip, pad=True))
