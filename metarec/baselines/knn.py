"""Neighbourhood collaborative filtering for new users: ``user_knn`` and ``item_knn``.

Both keep the training ratings as dense ``[users, items]`` arrays (memory ``O(U * I)``: about
80 MB (float32 + bool) for the ml-1m training users) and compute similarities for the evaluation
users on the fly inside one jitted function, mapped over tasks in chunks of ``task_chunk``
(``lax.map``). Similarities are shrunk by ``n_common / (n_common + shrink)`` where ``n_common`` is
the number of co-rating items (user_knn) or users (item_knn); only neighbours with similarity
``> min_sim`` are used, the ``k`` most similar of them (ties: lowest index first).

``user_knn`` (new user ``u`` given only the support set ``S_u``):
  * ``a_ui = r_ui - mean(S_u)``; training users are centred by their own training means.
  * ``sim(u, v) = sum_{i in C} a_ui a_vi / (sqrt(sum_{i in C} a_ui^2) sqrt(sum_{i in C} a_vi^2))``
    over the co-rated items ``C = S_u & I_v`` (cosine of mean-centred ratings), times the shrinkage.
  * ``pred(u, j) = mean(S_u) + sum_{v in N_k(u, j)} sim(u,v) (r_vj - mean_v) / sum |sim(u,v)|``,
    ``N_k(u, j)``: top-k of the training users who rated ``j``.
  * Fallbacks: no usable neighbour (including every item unseen in training) -> ``mean(S_u)``;
    empty support -> the global training mean. Support items unseen in training only contribute
    to ``mean(S_u)``.

``item_knn``:
  * ``c_ui = r_ui - m_i`` (training item mean ``m_i``), 0 where unobserved;
    ``sim(i, j) = c_i . c_j / (|c_i| |c_j|)`` (cosine of the item-mean-centred columns), times the
    shrinkage with ``n_common`` = users who rated both.
  * ``pred(u, j) = m_j + sum_{i in N_k(j; S_u)} sim(i,j) (r_ui - m_i) / sum |sim(i,j)|`` where
    ``N_k(j; S_u)`` are the top-k most similar items of the user's support set.
  * Fallbacks: seen query item without a usable neighbour -> ``m_j``; query item unseen in
    training -> the user's support mean (global mean if the support is empty). Support items
    unseen in training are ignored.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from metarec.baselines.common import (
    Baseline,
    lookup,
    make_predict,
    prepare_ratings,
    support_mean,
)


def _check(k, shrink, min_sim, task_chunk):
    k, task_chunk = int(k), int(task_chunk)
    if k < 1 or task_chunk < 1:
        raise ValueError(f"k and task_chunk must be >= 1, got k={k}, task_chunk={task_chunk}")
    if not shrink >= 0:
        raise ValueError(f"shrink must be >= 0, got {shrink}")
    return k, float(shrink), float(min_sim), task_chunk


def _shrunk_cosine(num, norm_a, norm_b, n_common, shrink):
    den = norm_a * norm_b
    cos = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    return cos * n_common / jnp.maximum(n_common + shrink, 1e-12)


def _weighted_deviation(cand_sim, dev, k):
    """Top-k (by similarity) weighted mean of deviations along the last axis.

    ``cand_sim`` has ``-inf`` for unusable neighbours. Returns ``(offset, has_neighbour)``.
    """
    k = min(k, cand_sim.shape[-1])
    top, idx = jax.lax.top_k(cand_sim, k)
    use = jnp.isfinite(top)
    w = jnp.where(use, top, 0.0)
    d = jnp.take_along_axis(dev, idx, axis=-1)
    den = jnp.sum(jnp.abs(w), axis=-1)
    ok = den > 0
    return jnp.where(ok, jnp.sum(w * d, axis=-1) / jnp.where(ok, den, 1.0), 0.0), ok


# ----------------------------------------------------------------------------------------------
# user-based
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class UserKNNState:
    """Training users as dense rows: centred ratings and observed mask (both ``[U, I]``)."""

    mu: jax.Array
    r_min: jax.Array
    r_max: jax.Array
    item_vocab: jax.Array  # [I]
    centred: jax.Array  # [U, I] r_vi - mean_v, 0 where unobserved
    observed: jax.Array  # [U, I] bool


def _centred_matrix(rows, cols, r, n_rows, n_cols):
    """Row means and the dense row-mean-centred ``[n_rows, n_cols]`` matrix (0 where unobserved)
    with its observed mask, from (row, col, rating) triples."""
    mean = np.bincount(rows, weights=r, minlength=n_rows) / np.bincount(rows, minlength=n_rows)
    centred = np.zeros((n_rows, n_cols), np.float32)
    observed = np.zeros((n_rows, n_cols), bool)
    centred[rows, cols] = r - mean[rows]
    observed[rows, cols] = True
    return mean, centred, observed


def fit_user_knn(user_ids, item_ids, ratings) -> UserKNNState:
    """Dense, user-mean-centred training matrix for :func:`user_knn`."""
    data = prepare_ratings(user_ids, item_ids, ratings)
    _, centred, observed = _centred_matrix(data.u, data.i, data.r, data.n_users, data.n_items)
    return UserKNNState(
        mu=jnp.float32(np.mean(data.r, dtype=np.float64)),
        r_min=jnp.float32(data.r.min()),
        r_max=jnp.float32(data.r.max()),
        item_vocab=jnp.asarray(data.item_vocab),
        centred=jnp.asarray(centred),
        observed=jnp.asarray(observed),
    )


def user_knn_similarity(state: UserKNNState, s_item, s_rat, s_mask, shrink: float):
    """Shrunk similarities ``[U]`` of ONE new user (support ``[S]``) to every training user, and
    the user's support mean (global mean if the support is empty)."""
    s_idx, s_known = lookup(state.item_vocab, s_item)
    m_user = support_mean(s_rat, s_mask, state.mu, 0.0)
    w = (s_mask > 0) & s_known
    a = jnp.where(w, s_rat - m_user, 0.0)  # [S]
    a_v = state.centred[:, s_idx]  # [U, S]
    o_v = state.observed[:, s_idx] & w  # [U, S]
    num = a_v @ a  # a_v is 0 where unobserved -> only co-rated items count
    norm_u = jnp.sqrt(o_v.astype(jnp.float32) @ jnp.square(a))
    norm_v = jnp.sqrt(jnp.sum(jnp.where(o_v, jnp.square(a_v), 0.0), axis=1))
    n_common = jnp.sum(o_v, axis=1).astype(jnp.float32)
    return _shrunk_cosine(num, norm_u, norm_v, n_common, shrink), m_user


def _user_knn_core(hp, state, s_item, s_rat, s_mask, q_item, q_mask):
    k, shrink, min_sim, task_chunk = hp

    def one_task(xs):
        s_item, s_rat, s_mask, q_item = xs
        sim, m_user = user_knn_similarity(state, s_item, s_rat, s_mask, shrink)
        q_idx, q_known = lookup(state.item_vocab, q_item)
        rated = state.observed[:, q_idx] & q_known  # [U, Q]
        cand = jnp.where(rated & (sim[:, None] > min_sim), sim[:, None], -jnp.inf)
        dev = state.centred[:, q_idx]  # [U, Q]
        off, _ = _weighted_deviation(cand.T, dev.T, k)  # [Q]
        return m_user + off

    return jax.lax.map(one_task, (s_item, s_rat, s_mask, q_item), batch_size=task_chunk)


def user_knn(
    k: int = 30,
    shrink: float = 10.0,
    min_sim: float = 0.0,
    task_chunk: int = 32,
    clip: bool = True,
) -> Baseline:
    """User-based kNN (see module docstring): ``k`` neighbours, similarity shrinkage ``shrink``,
    neighbours need similarity ``> min_sim``; ``task_chunk`` tasks are vectorised at a time."""
    k, shrink, min_sim, task_chunk = _check(k, shrink, min_sim, task_chunk)

    hp = (k, shrink, min_sim, task_chunk)
    # not make_predict(pad=True): lax.map computes the last, partial batch of task_chunk tasks at
    # its own size, and its values change (float rounding) when it is padded to a full batch
    return Baseline("user_knn", fit_user_knn, make_predict(_user_knn_core, hp, clip))


# ----------------------------------------------------------------------------------------------
# item-based
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class ItemKNNState:
    """Training items as dense rows: item-mean-centred ratings ``[I, U]``, observed mask, norms."""

    mu: jax.Array
    r_min: jax.Array
    r_max: jax.Array
    item_vocab: jax.Array  # [I]
    item_mean: jax.Array  # [I]
    centred: jax.Array  # [I, U] r_ui - m_i, 0 where unobserved
    observed: jax.Array  # [I, U] bool
    norm: jax.Array  # [I] |centred_i|


def fit_item_knn(user_ids, item_ids, ratings) -> ItemKNNState:
    """Dense, item-mean-centred (transposed) training matrix for :func:`item_knn`."""
    data = prepare_ratings(user_ids, item_ids, ratings)
    imean, centred, observed = _centred_matrix(data.i, data.u, data.r, data.n_items, data.n_users)
    return ItemKNNState(
        mu=jnp.float32(np.mean(data.r, dtype=np.float64)),
        r_min=jnp.float32(data.r.min()),
        r_max=jnp.float32(data.r.max()),
        item_vocab=jnp.asarray(data.item_vocab),
        item_mean=jnp.asarray(imean, jnp.float32),
        centred=jnp.asarray(centred),
        observed=jnp.asarray(observed),
        norm=jnp.asarray(
            np.sqrt(np.sum(np.square(centred, dtype=np.float64), axis=1)), jnp.float32
        ),
    )


def item_knn_similarity(state: ItemKNNState, idx_a, idx_b, shrink: float):
    """Shrunk item-item similarities ``[A, B]`` between dense item indices ``idx_a``, ``idx_b``."""
    ca, cb = state.centred[idx_a], state.centred[idx_b]
    oa = state.observed[idx_a].astype(jnp.float32)
    ob = state.observed[idx_b].astype(jnp.float32)
    return _shrunk_cosine(
        ca @ cb.T, state.norm[idx_a][:, None], state.norm[idx_b][None, :], oa @ ob.T, shrink
    )


def _item_knn_core(hp, state, s_item, s_rat, s_mask, q_item, q_mask):
    k, shrink, min_sim, task_chunk = hp

    def one_task(xs):
        s_item, s_rat, s_mask, q_item = xs
        s_idx, s_known = lookup(state.item_vocab, s_item)
        q_idx, q_known = lookup(state.item_vocab, q_item)
        usable = (s_mask > 0) & s_known  # [S]
        sim = item_knn_similarity(state, q_idx, s_idx, shrink)  # [Q, S]
        cand = jnp.where(usable[None, :] & (sim > min_sim), sim, -jnp.inf)
        dev = jnp.broadcast_to(s_rat - state.item_mean[s_idx], cand.shape)
        off, _ = _weighted_deviation(cand, dev, k)
        m_user = support_mean(s_rat, s_mask, state.mu, 0.0)
        return jnp.where(q_known, state.item_mean[q_idx] + off, m_user)

    return jax.lax.map(one_task, (s_item, s_rat, s_mask, q_item), batch_size=task_chunk)


def item_knn(
    k: int = 30,
    shrink: float = 10.0,
    min_sim: float = 0.0,
    task_chunk: int = 32,
    clip: bool = True,
) -> Baseline:
    """Item-based kNN (see module docstring): ``k`` most similar support items, similarity
    shrinkage ``shrink``, neighbours need similarity ``> min_sim``."""
    k, shrink, min_sim, task_chunk = _check(k, shrink, min_sim, task_chunk)

    hp = (k, shrink, min_sim, task_chunk)
    return Baseline("item_knn", fit_item_knn, make_predict(_item_knn_core, hp, clip))
