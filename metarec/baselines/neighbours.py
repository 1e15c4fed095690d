"""The two kNN baselines' predictions as per-example model inputs, leave-one-out on the support.

A meta-learner that should contain neighbourhood CF needs, for every support and query example of
a task, what ``user_knn`` and ``item_knn`` predict given only the task's support set
(:mod:`metarec.baselines.knn` has the formulas, fallbacks included)::

    f_user(u, t) = mean(S_u) + sum_{v in N_k(u, t)} sim(u, v) (r_vt - mean_v) / sum |sim(u, v)|
    f_item(u, t) = m_t + sum_{i in N_k(t; S_u)} sim(i, t) (r_ui - m_i) / sum |sim(i, t)|

For a target ``t`` that is itself a support item (the inner loop's own examples), the support
entry of ``t`` is left out: of the support mean, of item-kNN's neighbours and of user-kNN's
user-user similarities (whose centring alone still uses the full support mean). The task's own
user is never its own neighbour (its support ratings may be among the fitted ratings). So an
inner loop fitting the support set sees features that do not contain the rating it is fitting.
Query targets (not in the support) get exactly ``user_knn``'s and ``item_knn``'s unclipped
predictions.

:func:`mf_features` does the same for the ``mf`` baseline (ridge fold-in of ``(b_u, p_u)`` on the
support with the fitted item side fixed): a support target's fold-in leaves its own entries out,
a query target gets ``mf``'s unclipped prediction.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from metarec.baselines.common import lookup, prepare_ratings, support_mean
from metarec.baselines.knn import (
    ItemKNNState,
    UserKNNState,
    _check,
    _shrunk_cosine,
    _weighted_deviation,
    fit_item_knn,
    fit_user_knn,
    item_knn_similarity,
)
from metarec.baselines.mf import MFState
from metarec.data.tasks import Task, map_blocks

N_FEATURES = 2  # (user-kNN prediction, item-kNN prediction)
PAD_TASKS = 128  # tasks per compiled call
PAD_ITEMS = 128  # the fitted item axis is padded to a multiple of this
CONTENT_SHRINK = 2.0  # content_features' prior weight on the support mean (offset_prior's value)


@flax.struct.dataclass
class NeighbourState:
    """Both kNN baselines' fitted states plus the fitted users' raw ids (to skip the task's own)."""

    user: UserKNNState
    item: ItemKNNState
    user_vocab: jax.Array  # [U] sorted raw user ids, the rows of ``user.centred``


def fit_neighbours(user_ids, item_ids, ratings) -> NeighbourState:
    """Fit both neighbourhood states on the same training triples."""
    vocab = prepare_ratings(user_ids, item_ids, ratings).user_vocab
    return NeighbourState(
        user=fit_user_knn(user_ids, item_ids, ratings),
        item=fit_item_knn(user_ids, item_ids, ratings),
        user_vocab=jnp.asarray(vocab.astype(np.int32)),
    )


def _user_dev(st: UserKNNState, own, s_item, s_rat, s_mask, t_item, k, shrink):
    s_idx, s_known = lookup(st.item_vocab, s_item)
    w = (s_mask > 0) & s_known
    a = jnp.where(w, s_rat - support_mean(s_rat, s_mask, st.mu, 0.0), 0.0)  # [S]
    o_v = (st.observed[:, s_idx] & w).astype(jnp.float32)  # [U, S]
    a_v = st.centred[:, s_idx] * o_v
    # eq[r, s]: support entry s is target r's item (left out of r's similarities)
    eq = ((t_item[:, None] == s_item[None, :]) & w[None, :]).astype(jnp.float32)  # [R, S]

    def total_minus_left_out(terms):  # [U, S] -> [U, R]
        return jnp.sum(terms, axis=1, keepdims=True) - terms @ eq.T

    num = total_minus_left_out(a_v * a)
    norm_u = jnp.sqrt(jnp.maximum(total_minus_left_out(o_v * a**2), 0.0))
    norm_v = jnp.sqrt(jnp.maximum(total_minus_left_out(a_v**2), 0.0))
    sim = _shrunk_cosine(num, norm_u, norm_v, total_minus_left_out(o_v), shrink)  # [U, R]
    t_idx, t_known = lookup(st.item_vocab, t_item)
    rated = st.observed[:, t_idx] & t_known[None, :]
    other = (jnp.arange(sim.shape[0]) != own)[:, None]
    cand = jnp.where(rated & other & (sim > 0), sim, -jnp.inf)
    off, _ = _weighted_deviation(cand.T, st.centred[:, t_idx].T, k)
    # the base is the mean of every support rating, as user_knn's: an unfitted support item
    # counts there though it has no neighbours
    m = s_mask > 0
    eq_all = ((t_item[:, None] == s_item[None, :]) & m[None, :]).astype(jnp.float32)
    return _loo_mean(s_rat, m, eq_all, st.mu) + off


def _loo_mean(s_rat, w, eq, mu):
    """Per target ``[R]``: the support mean without the target's own entry (``mu`` if empty)."""
    wf = w.astype(jnp.float32)
    n = jnp.sum(wf) - eq @ wf
    tot = jnp.sum(wf * s_rat) - eq @ (wf * s_rat)
    return jnp.where(n > 0, tot / jnp.where(n > 0, n, 1.0), mu)


def _item_dev(st: ItemKNNState, s_item, s_rat, s_mask, t_item, k, shrink):
    s_idx, s_known = lookup(st.item_vocab, s_item)
    t_idx, t_known = lookup(st.item_vocab, t_item)
    same = t_item[:, None] == s_item[None, :]
    usable = ((s_mask > 0) & s_known)[None, :] & ~same
    sim = item_knn_similarity(st, t_idx, s_idx, shrink)  # [R, S]
    cand = jnp.where(usable & (sim > 0), sim, -jnp.inf)
    dev = jnp.broadcast_to(s_rat - st.item_mean[s_idx], cand.shape)
    off, _ = _weighted_deviation(cand, dev, k)
    # an item unseen in the fitted ratings: the user's support mean (item_knn's fallback)
    eq = (same & (s_mask > 0)[None, :]).astype(jnp.float32)
    return jnp.where(t_known, st.item_mean[t_idx] + off, _loo_mean(s_rat, s_mask > 0, eq, st.mu))


def neighbour_features(
    state: NeighbourState,
    support_item,
    support_rating,
    support_mask,
    target_item,
    user_ids,
    *,
    k: int = 30,
    shrink: float = 10.0,
    task_chunk: int = 32,
) -> np.ndarray:
    """``[T, R, 2]`` float32 (user-kNN, item-kNN prediction) for targets ``target_item [T, R]``
    (raw ids) of ``T`` tasks with supports ``[T, S]`` (raw ids, ratings, 0/1 mask) and raw user
    ids ``[T]``; ``k`` neighbours and similarity shrinkage ``shrink`` as in the baselines."""
    k, shrink, _, task_chunk = _check(k, shrink, 0.0, task_chunk)
    arrays = [np.asarray(a) for a in (user_ids, support_item, support_rating, support_mask)]
    arrays.append(np.asarray(target_item))
    # every call sees PAD_TASKS tasks (the last block padded) and an item axis padded to a
    # multiple of PAD_ITEMS: task sets of any size and states fitted on a few more or fewer items
    # (other seeds, other rating subsets) share one compiled program; a block is whole
    # task_chunk batches, so a task's features do not depend on the block it is in
    state = _pad_items(state, PAD_ITEMS)

    def block(users, s_item, s_rat, s_mask, t_item):
        idx, known = lookup(state.user_vocab, jnp.asarray(users))
        own = jnp.where(known, idx, -1)  # the task user's row among the fitted users, -1 if none
        return _features(
            state,
            own,
            jnp.asarray(s_item, jnp.int32),
            jnp.asarray(s_rat, jnp.float32),
            jnp.asarray(s_mask, jnp.float32),
            jnp.asarray(t_item, jnp.int32),
            k,
            shrink,
            task_chunk,
        )

    return map_blocks(block, arrays, PAD_TASKS)


def _pad_axis(a, p: int, axis: int = 0, value=0) -> jax.Array:
    """``a`` with ``p`` entries of ``value`` appended along ``axis``, built on the host (padding
    compiles no program per fitted shape)."""
    widths = [(0, 0)] * np.ndim(a)
    widths[axis] = (0, p)
    return jnp.asarray(np.pad(np.asarray(a), widths, constant_values=value))


def _pad_vocab(vocab, p: int) -> jax.Array:
    """A sorted id vocabulary with ``p`` ids appended that sort after every real id and match none
    (int32 max)."""
    return _pad_axis(np.asarray(vocab, np.int32), p, value=np.iinfo(np.int32).max)


def _pad_items(state: NeighbourState, multiple: int) -> NeighbourState:
    """``state`` with its item axis padded to a multiple of ``multiple``: the padded items' ids sort
    after every real id and match none (int32 max), they are observed by nobody and carry zeros, so
    no lookup, similarity or neighbour changes."""
    n_items = state.user.item_vocab.shape[0]
    p = -n_items % multiple
    if p == 0:
        return state
    vocab = _pad_vocab(state.user.item_vocab, p)
    user = state.user.replace(
        item_vocab=vocab,
        centred=_pad_axis(state.user.centred, p, 1),
        observed=_pad_axis(state.user.observed, p, 1),
    )
    item = state.item.replace(
        item_vocab=vocab,
        item_mean=_pad_axis(state.item.item_mean, p),
        centred=_pad_axis(state.item.centred, p),
        observed=_pad_axis(state.item.observed, p),
        norm=_pad_axis(state.item.norm, p),
    )
    return state.replace(user=user, item=item)


@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _features(state, own, s_item, s_rat, s_mask, t_item, k, shrink, task_chunk):
    def one(xs):
        own, s_item, s_rat, s_mask, t_item = xs
        fu = _user_dev(state.user, own, s_item, s_rat, s_mask, t_item, k, shrink)
        fi = _item_dev(state.item, s_item, s_rat, s_mask, t_item, k, shrink)
        return jnp.stack([fu, fi], axis=-1)

    return jax.lax.map(one, (own, s_item, s_rat, s_mask, t_item), batch_size=task_chunk)


def _mf_loo(st: MFState, reg, s_item, s_rat, s_mask, t_item, as_new=False):
    """``[R]`` MF fold-in predictions for one task's targets, each target's own support entries
    left out of its ridge solve (one ``(d+1)``-square solve per target); ``as_new``: every target
    as an unfitted item (``mu + b_u``)."""
    s_idx, s_known = lookup(st.item_vocab, s_item)
    w = (s_mask > 0) & s_known
    q = st.item_factors[s_idx]
    x = jnp.concatenate([jnp.ones_like(q[:, :1]), q], axis=1)  # [S, d+1]
    y = s_rat - st.mu - st.item_bias[s_idx]
    keep = w[None, :] & (t_item[:, None] != s_item[None, :])  # [R, S]
    xw = x[None] * keep[..., None].astype(jnp.float32)  # [R, S, d+1]
    a = jnp.einsum("rsi,sj->rij", xw, x) + reg * jnp.eye(x.shape[1], dtype=x.dtype)
    theta = jnp.linalg.solve(a, jnp.einsum("rsi,s->ri", xw, y)[..., None])[..., 0]  # [R, d+1]
    t_idx, t_known = lookup(st.item_vocab, t_item)
    t_known = t_known & (not as_new)
    b_t = jnp.where(t_known, st.item_bias[t_idx], 0.0)
    x_t = jnp.where(t_known[:, None], st.item_factors[t_idx], 0.0)
    return st.mu + b_t + theta[:, 0] + jnp.sum(theta[:, 1:] * x_t, axis=1)


@functools.partial(jax.jit, static_argnums=(6,))
def _mf_block(state, reg, s_item, s_rat, s_mask, t_item, task_chunk):
    def one(xs):
        return _mf_loo(state, reg, *xs)

    return jax.lax.map(one, (s_item, s_rat, s_mask, t_item), batch_size=task_chunk)


def mf_features(
    state: MFState,
    reg: float,
    support_item,
    support_rating,
    support_mask,
    target_item,
    *,
    task_chunk: int = 32,
) -> np.ndarray:
    """``[T, R]`` float32: the ``mf`` baseline's fold-in prediction (ridge ``reg`` > 0 on
    ``(b_u, p_u)``, the baseline's ``fold_in_reg``) for targets ``target_item [T, R]`` of ``T``
    tasks with supports ``[T, S]`` (raw ids, ratings, 0/1 mask), leave-one-out on support targets
    (module docstring). An item outside the fitted vocabulary gets ``mu + b_u``."""
    if not reg > 0:
        raise ValueError(f"mf_features needs a ridge reg > 0, got {reg}")
    arrays = (support_item, support_rating, support_mask, target_item)
    return _task_blocks(_mf_block, (_fold_in_side(state), jnp.float32(reg)), arrays, task_chunk)


def _fold_in_side(state: MFState) -> MFState:
    """What :func:`_mf_loo` reads of ``state``, shaped so that states fitted on other folds or
    seeds share one compiled program: the item axis padded to a multiple of ``PAD_ITEMS`` (as
    :func:`_pad_items`: ids int32 max that match none, zero bias and factors, so no lookup or
    gather changes) and the user tables and loss history, which fold-in never reads, empty."""
    n_items, d = state.item_factors.shape
    p = -n_items % PAD_ITEMS

    def empty(a, *shape):
        return jnp.asarray(np.zeros(shape, a.dtype))

    return state.replace(
        item_vocab=_pad_vocab(state.item_vocab, p),
        item_bias=_pad_axis(state.item_bias, p),
        item_factors=_pad_axis(state.item_factors, p),
        user_vocab=empty(state.user_vocab, 0),
        user_bias=empty(state.user_bias, 0),
        user_factors=empty(state.user_factors, 0, d),
        loss_history=empty(state.loss_history, 0),
    )


def _task_blocks(fn, head, arrays, task_chunk):
    """``fn(*head, s_item, s_rat, s_mask, t_item, task_chunk)`` (jitted, ``lax.map`` over tasks)
    run over blocks of ``PAD_TASKS`` tasks of the numpy ``arrays`` (support ids, ratings, mask,
    target ids), so task sets of any size share one compiled program."""

    def block(s_item, s_rat, s_mask, t_item):
        return fn(
            *head,
            jnp.asarray(s_item, jnp.int32),
            jnp.asarray(s_rat, jnp.float32),
            jnp.asarray(s_mask, jnp.float32),
            jnp.asarray(t_item, jnp.int32),
            int(task_chunk),
        )

    return map_blocks(block, [np.asarray(a) for a in arrays], PAD_TASKS)


@functools.partial(jax.jit, static_argnums=(6,))
def _new_block(mus, mf, s_item, s_rat, s_mask, t_item, task_chunk):
    user_mu, item_mu = mus

    def one(xs):
        s_item, s_rat, s_mask, t_item = xs
        m = s_mask > 0
        eq = ((t_item[:, None] == s_item[None, :]) & m[None, :]).astype(jnp.float32)
        cols = [_loo_mean(s_rat, m, eq, user_mu), _loo_mean(s_rat, m, eq, item_mu)]
        if mf is not None:
            cols.append(_mf_loo(mf[0], mf[1], s_item, s_rat, s_mask, t_item, as_new=True))
        return jnp.stack(cols, axis=-1)

    return jax.lax.map(one, (s_item, s_rat, s_mask, t_item), batch_size=task_chunk)


def new_item_features(
    state: NeighbourState,
    support_item,
    support_rating,
    support_mask,
    target_item,
    mf=None,
    *,
    task_chunk: int = 32,
) -> np.ndarray:
    """``[T, R, 2]`` (``[T, R, 3]`` with ``mf = (MFState, fold-in reg)``) float32: what
    :func:`neighbour_features` (and :func:`mf_features`) give each target if its item had no
    fitted rating, leave-one-out on support targets as there: both kNN fallbacks are the support
    mean without the target's own entry, the MF fold-in is ``mu + b_u``. For an item that really
    is unfitted this equals those functions' output; for a fitted one it is what a model that
    drops the item's id (a simulated new item) should be given."""
    mf_arg = None if mf is None else (_fold_in_side(mf[0]), jnp.float32(mf[1]))
    arrays = (support_item, support_rating, support_mask, target_item)
    # only the two fallback means of ``state`` go in, so its fitted shapes do not recompile this
    return _task_blocks(_new_block, ((state.user.mu, state.item.mu), mf_arg), arrays, task_chunk)


def content_features(
    support_genres,
    support_rating,
    support_mask,
    support_item,
    target_genres,
    target_item,
    fallback=None,
    shrink: float = CONTENT_SHRINK,
) -> np.ndarray:
    """``[T, R]`` float32: a content kNN over the user's own support ratings, for items nobody's
    ratings describe (new items). The leave-one-out support mean ``m`` plus the
    similarity-weighted deviation of the support ratings from it::

        f(u, t) = m + sum_j sim(t, j) (r_uj - m) / (sum_j sim(t, j) + shrink)

    with ``sim`` the cosine of the genre vectors (``[T, R, G]`` / ``[T, S, G]``, 0/1), over the
    support entries other than the target's own (the target itself when it is a support item;
    ``m`` leaves it out too). A target without genres, or without a support item sharing one,
    gets ``m``; one with no other support entry gets ``fallback [T, R]`` (default 0)."""
    if not shrink > 0:
        raise ValueError(f"content_features needs shrink > 0, got {shrink}")
    arrays = [
        np.asarray(a)
        for a in (support_genres, support_rating, support_mask, support_item, target_genres)
    ]
    t_item = np.asarray(target_item)
    fb = np.zeros(t_item.shape) if fallback is None else np.asarray(fallback, np.float64)
    out = np.zeros(t_item.shape, np.float32)
    for lo in range(0, len(t_item), PAD_TASKS):  # blocks of tasks bound the [T, R, S] arrays
        sl = slice(lo, lo + PAD_TASKS)
        out[sl] = _content_block(*(a[sl] for a in arrays), t_item[sl], fb[sl], float(shrink))
    return out


def _content_block(gs, s_rat, s_mask, s_item, gt, t_item, fallback, shrink):
    gs, gt = gs.astype(np.float64), gt.astype(np.float64)
    gs = gs / np.maximum(np.linalg.norm(gs, axis=-1, keepdims=True), 1e-12)
    gt = gt / np.maximum(np.linalg.norm(gt, axis=-1, keepdims=True), 1e-12)
    keep = (s_mask > 0)[:, None, :] & (t_item[:, :, None] != s_item[:, None, :])  # [T, R, S]
    r = s_rat.astype(np.float64)[:, None, :]
    n = keep.sum(-1)
    m = np.where(n > 0, (r * keep).sum(-1) / np.maximum(n, 1), fallback)
    sim = np.einsum("trg,tsg->trs", gt, gs) * keep
    return m + (sim * (r - m[..., None])).sum(-1) / (sim.sum(-1) + shrink)


def with_neighbours(
    task: Task,
    sets,
    state: NeighbourState,
    mf=None,
    new_items: bool = False,
    content: bool = False,
) -> Task:
    """``task`` (encoded from ``sets``, a :class:`metarec.data.UserSets` padded as the task is)
    with ``x["nbr"]`` on its support and query examples: :func:`neighbour_features`, and with
    ``mf = (MFState, fold-in reg)`` :func:`mf_features` as a third feature; with ``new_items``
    also ``x["nbr_new"]``, the same features as if each example's item were new
    (:func:`new_item_features`), whose item-kNN column is, with ``content``, the
    :func:`content_features` of the item's genres (its fallback where the support is empty)."""
    if content and not new_items:
        raise ValueError("content features are new-item features: they need new_items=True")
    s_genres = task.support.x["genres"]
    if content and s_genres.shape[:2] != np.shape(sets.support_item):
        raise ValueError(
            f"task support {s_genres.shape[:2]} and sets support "
            f"{np.shape(sets.support_item)} differ: pad the sets as the task is"
        )

    def add(ex, items):
        f = neighbour_features(
            state, sets.support_item, sets.support_rating, sets.support_mask, items, sets.user_id
        )
        if mf is not None:
            m = mf_features(*mf, sets.support_item, sets.support_rating, sets.support_mask, items)
            f = np.concatenate([f, m[..., None]], axis=-1)
        x = {"nbr": f}
        if new_items:
            x["nbr_new"] = np.array(
                new_item_features(
                    state, sets.support_item, sets.support_rating, sets.support_mask, items, mf
                )
            )
            if content:
                x["nbr_new"][..., 1] = content_features(
                    s_genres, sets.support_rating, sets.support_mask, sets.support_item,
                    ex.x["genres"], items, x["nbr_new"][..., 1],
                )  # fmt: skip
        return ex.replace(x=ex.x | x)

    return task.replace(
        support=add(task.support, sets.support_item), query=add(task.query, sets.query_item)
    )
