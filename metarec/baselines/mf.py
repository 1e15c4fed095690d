"""Biased matrix factorisation with closed-form fold-in of new users.

Model: ``r_ui ~ mu + b_u + b_i + p_u . q_i`` with ``mu`` fixed to the training mean.

Training (:func:`train_mf`) minimises, full batch, with optax Adam inside one jitted ``lax.scan``::

    L = ( sum_{(u,i) observed} (r_ui - r^_ui)^2 + reg * (|b_u|^2 + |b_i|^2 + |P|^2 + |Q|^2) ) / N

(the division by the number of ratings ``N`` only rescales the step size). The RL simulator fits
the same model with ``l2_form="rated"`` (:func:`mf_objective_rated`): the L2 term is averaged over
the ratings, so each user's and item's parameters are penalised in proportion to their number of
ratings. Because the baselines' regulariser is in "sum" form, the part of ``L`` that depends on
ONE user with the item parameters held fixed is exactly
``sum_{i in I_u} (r_ui - mu - b_i - b_u - p_u . q_i)^2 + reg (b_u^2 + |p_u|^2)``.

Fold-in (:func:`mf_fold_in`): an evaluation user (not in training) gets ``theta = (b_u, p_u)`` as
the exact minimiser of that per-user ridge problem on their support set, with ``fold_in_reg``
(default: the training ``reg``, which makes fold-in of a training user agree with training at the
optimum). With ``x_i = [1, q_i]`` and ``y_i = r_i - mu - b_i``::

    theta = (X^T W X + fold_in_reg * I)^{-1} X^T W y        (W = support mask)

solved by Cholesky (``fold_in_reg > 0``) or the pseudo-inverse (``fold_in_reg == 0``, minimum-norm
least squares).

Unseen items: support items not seen in training carry no item parameters and are left out of the
fold-in (they still do not break anything); an unseen query item is predicted ``mu + b_u``
(``b_i = 0``, ``q_i = 0``). An empty support gives ``b_u = 0, p_u = 0`` (with ``fold_in_reg > 0``).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import optax

from metarec.baselines.common import Baseline, lookup, make_predict, prepare_ratings


@flax.struct.dataclass
class MFState:
    """Fitted MF: item parameters (users are folded in at prediction time) and training users'
    parameters (kept for inspection only)."""

    mu: jax.Array
    r_min: jax.Array
    r_max: jax.Array
    item_vocab: jax.Array  # [I] sorted raw item ids
    item_bias: jax.Array  # [I]
    item_factors: jax.Array  # [I, d]
    user_vocab: jax.Array  # [U] sorted raw training user ids
    user_bias: jax.Array  # [U]
    user_factors: jax.Array  # [U, d]
    loss_history: jax.Array  # [steps] training objective L per step


def mf_predict_dense(params, mu, u, i):
    """``mu + b_u + b_i + p_u . q_i`` for index arrays ``u``, ``i``."""
    return (
        mu
        + params["user_bias"][u]
        + params["item_bias"][i]
        + jnp.sum(params["user_factors"][u] * params["item_factors"][i], axis=-1)
    )


def mf_objective(params, mu, u, i, r, reg):
    """The training objective ``L`` above (mean-normalised, sum-form L2)."""
    err = r - mf_predict_dense(params, mu, u, i)
    l2 = sum(jnp.sum(jnp.square(p)) for p in jax.tree_util.tree_leaves(params))
    return (jnp.sum(jnp.square(err)) + reg * l2) / r.shape[0]


def mf_objective_rated(params, mu, u, i, r, reg):
    """Mean squared error plus ``reg`` times the mean, over the ratings, of the rated user's and
    item's squared parameters (a frequency-weighted L2; the simulator's fit)."""
    mse = jnp.mean((mf_predict_dense(params, mu, u, i) - r) ** 2)
    l2 = jnp.mean(
        jnp.sum(params["user_factors"][u] ** 2, -1)
        + jnp.sum(params["item_factors"][i] ** 2, -1)
        + params["user_bias"][u] ** 2
        + params["item_bias"][i] ** 2
    )
    return mse + reg * l2


@jax.jit
def mf_mse(params, mu, u, i, r):
    """Mean squared training error of fitted ``params``."""
    return jnp.mean((mf_predict_dense(params, mu, u, i) - r) ** 2)


_OBJECTIVES = {"sum": mf_objective, "rated": mf_objective_rated}


@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _mf_scan(params, mu, u, i, r, reg, lr, steps, objective=mf_objective):
    opt = optax.adam(lr)
    loss_grad = jax.value_and_grad(objective)

    def step(carry, _):
        p, s = carry
        loss, g = loss_grad(p, mu, u, i, r, reg)
        upd, s = opt.update(g, s, p)
        return (optax.apply_updates(p, upd), s), loss

    (p, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return p, losses


def train_mf(
    u,
    i,
    r,
    n_users: int,
    n_items: int,
    *,
    dim: int,
    reg: float,
    lr: float,
    steps: int,
    init_scale: float,
    key: jax.Array,
    l2_form: str = "sum",
    mu=None,
):
    """Full-batch Adam on :func:`mf_objective` (``l2_form="sum"``) or :func:`mf_objective_rated`
    (``"rated"``); one jitted scan. Returns ``(params, mu, losses)``.

    ``u``, ``i`` dense indices, ``r`` ratings (all 1-D, equal length). ``mu``: the fixed global
    mean (default: the float32 mean of ``r``). Factors start at ``N(0, init_scale^2)``, biases at
    0; deterministic given ``key``.
    """
    if l2_form not in _OBJECTIVES:
        raise ValueError(f"l2_form must be one of {', '.join(_OBJECTIVES)}, got {l2_form!r}")
    u = jnp.asarray(u, jnp.int32)
    i = jnp.asarray(i, jnp.int32)
    r = jnp.asarray(r, jnp.float32)
    mu = jnp.mean(r) if mu is None else jnp.float32(mu)
    ku, ki = jax.random.split(key)
    params = {
        "user_bias": jnp.zeros((n_users,), jnp.float32),
        "item_bias": jnp.zeros((n_items,), jnp.float32),
        "user_factors": init_scale * jax.random.normal(ku, (n_users, dim), jnp.float32),
        "item_factors": init_scale * jax.random.normal(ki, (n_items, dim), jnp.float32),
    }
    objective = _OBJECTIVES[l2_form]
    params, losses = _mf_scan(
        params, mu, u, i, r, jnp.float32(reg), float(lr), int(steps), objective
    )
    return params, mu, losses


def mf_fold_in(item_bias, item_factors, mu, idx, rating, weight, reg: float):
    """Closed-form ridge fold-in of one user's ``(b_u, p_u)`` with item parameters fixed.

    Args:
      item_bias ``[I]``, item_factors ``[I, d]``, mu: fitted item side.
      idx ``[S]`` dense item indices, rating ``[S]``, weight ``[S]`` (0 = padding / unknown item).
      reg: ridge strength on ``(b_u, p_u)``; 0 uses the pseudo-inverse (min-norm least squares).
    Returns ``(b_u scalar, p_u [d])``. vmap over a leading task axis for a batch.
    """
    q = item_factors[idx]  # [S, d]
    x = jnp.concatenate([jnp.ones_like(q[:, :1]), q], axis=1)  # [S, d+1]
    y = rating - mu - item_bias[idx]
    w = jnp.asarray(weight, jnp.float32)
    xw = x * w[:, None]
    a = xw.T @ x
    b = xw.T @ y
    if reg > 0:
        a = a + reg * jnp.eye(a.shape[0], dtype=a.dtype)
        theta = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a), b)
    else:
        theta = jnp.linalg.pinv(a) @ b
    return theta[0], theta[1:]


def _mf_core(hp, state, s_item, s_rat, s_mask, q_item, q_mask):
    (f_reg,) = hp
    s_idx, s_known = lookup(state.item_vocab, s_item)
    w = s_mask * s_known
    fold = jax.vmap(
        lambda i, r, ww: mf_fold_in(state.item_bias, state.item_factors, state.mu, i, r, ww, f_reg)
    )
    b_u, p_u = fold(s_idx, s_rat, w)  # [T], [T, d]
    q_idx, q_known = lookup(state.item_vocab, q_item)
    b_i = jnp.where(q_known, state.item_bias[q_idx], 0.0)
    q_f = jnp.where(q_known[..., None], state.item_factors[q_idx], 0.0)  # [T, Q, d]
    return state.mu + b_u[:, None] + b_i + jnp.einsum("td,tqd->tq", p_u, q_f)


#: the ``mf`` baseline's default L2 strength (also its default fold-in ridge)
DEFAULT_REG = 5.0


def mf(
    dim: int = 8,
    reg: float = DEFAULT_REG,
    lr: float = 0.05,
    steps: int = 500,
    init_scale: float = 0.1,
    fold_in_reg: float | None = None,
    seed: int = 0,
    clip: bool = True,
) -> Baseline:
    """Biased MF trained by full-batch Adam (``steps`` steps, learning rate ``lr``, sum-form L2
    ``reg``, factor dimension ``dim``, init ``N(0, init_scale^2)`` from ``seed``); new users are
    folded in from their support set in closed form with ``fold_in_reg`` (default ``reg``)."""
    dim, steps = int(dim), int(steps)
    if dim < 1 or steps < 0:
        raise ValueError(f"mf needs dim >= 1 and steps >= 0, got dim={dim}, steps={steps}")
    if not (reg >= 0 and lr > 0 and init_scale >= 0):
        raise ValueError(
            f"mf needs reg >= 0, lr > 0, init_scale >= 0; got {reg}, {lr}, {init_scale}"
        )
    f_reg = float(reg if fold_in_reg is None else fold_in_reg)
    if not f_reg >= 0:
        raise ValueError(f"fold_in_reg must be >= 0, got {fold_in_reg}")

    def fit(user_ids, item_ids, ratings) -> MFState:
        data = prepare_ratings(user_ids, item_ids, ratings)
        params, mu, losses = train_mf(
            data.u,
            data.i,
            data.r,
            data.n_users,
            data.n_items,
            dim=dim,
            reg=float(reg),
            lr=float(lr),
            steps=steps,
            init_scale=float(init_scale),
            key=jax.random.key(seed),
        )
        return MFState(
            mu=mu,
            r_min=jnp.float32(data.r.min()),
            r_max=jnp.float32(data.r.max()),
            item_vocab=jnp.asarray(data.item_vocab),
            item_bias=params["item_bias"],
            item_factors=params["item_factors"],
            user_vocab=jnp.asarray(data.user_vocab),
            user_bias=params["user_bias"],
            user_factors=params["user_factors"],
            loss_history=losses,
        )

    return Baseline("mf", fit, make_predict(_mf_core, (f_reg,), clip, pad=True))
