"""Shared pieces of the non-meta baselines: the :class:`Baseline` interface, input validation,
raw-id lookup and prediction post-processing.

Interface (optax-like: a NamedTuple of pure functions; the fitted state is an explicit pytree)::

    baseline = make_baseline("mf", dim=8)
    state = baseline.fit(user_ids, item_ids, ratings)        # host numpy, training users only
    pred = baseline.predict(state, support_item, support_rating, support_mask,
                            query_item, query_mask, user_ids)  # [T, Q] float32 (jitted)

``fit`` takes 1-D numpy arrays of raw (arbitrary integer) ids and ratings of the TRAINING users.
``predict`` gets, for ``T`` evaluation users, only their support sets ``[T, S]`` and the query
items ``[T, Q]`` (raw item ids, padded, with 0/1 masks). Evaluation users are not in the training
data, so ``user_ids`` is accepted for interface uniformity and traceability but never used to look
anything up. Predictions at padded query slots are 0.0. Items never seen in training are handled
by each baseline's documented fallback; by default predictions are clipped to the training rating
range ``[min(ratings), max(ratings)]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metarec.data.tasks import map_blocks

_INT32_MAX = np.iinfo(np.int32).max
# make_predict(pad=True): tasks per compiled call, and support widths padded to a multiple of
PAD_TASKS = 64
SUPPORT_MULTIPLE = 32


class Baseline(NamedTuple):
    """A non-meta rating predictor for the cold-start protocol.

    Attributes:
      name: registry name (as used on the command line and in ``results.json``).
      fit: ``fit(user_ids, item_ids, ratings) -> state`` (host-side; state is a pytree).
      predict: ``predict(state, support_item, support_rating, support_mask, query_item,
        query_mask, user_ids) -> pred [T, Q] float32``.
    """

    name: str
    fit: Callable[..., Any]
    predict: Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Ratings:
    """Validated training ratings: raw ids and their dense indices.

    ``user_vocab`` / ``item_vocab`` are the sorted unique raw ids (host numpy), ``u`` / ``i`` the
    dense indices into them, ``r`` float32 ratings.
    """

    user_vocab: np.ndarray
    item_vocab: np.ndarray
    u: np.ndarray
    i: np.ndarray
    r: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.user_vocab)

    @property
    def n_items(self) -> int:
        return len(self.item_vocab)


def _check_ids(name: str, a: np.ndarray) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ids, got dtype {a.dtype}")
    if a.size and (a.min() < -_INT32_MAX or a.max() > _INT32_MAX):
        raise ValueError(f"{name} holds ids outside the int32 range; re-encode them first")
    return a


def prepare_ratings(user_ids, item_ids, ratings) -> Ratings:
    """Validate training triples and encode raw ids densely.

    Raises ``ValueError`` naming the field for: non-1-D or unequal lengths, no ratings,
    non-integer ids, non-finite ratings, or a duplicated (user, item) pair (with its position).
    """
    u = np.asarray(user_ids)
    i = np.asarray(item_ids)
    r = np.asarray(ratings)
    for name, a in (("user_ids", u), ("item_ids", i), ("ratings", r)):
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if not (len(u) == len(i) == len(r)):
        raise ValueError(
            f"user_ids, item_ids, ratings must have equal lengths, got {len(u)}, {len(i)}, {len(r)}"
        )
    if len(r) == 0:
        raise ValueError("no training ratings given")
    _check_ids("user_ids", u)
    _check_ids("item_ids", i)
    r = r.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(r))
    if bad.size:
        raise ValueError(f"ratings[{bad[0]}] = {r[bad[0]]} is not finite")
    user_vocab, u_idx = np.unique(u, return_inverse=True)
    item_vocab, i_idx = np.unique(i, return_inverse=True)
    key = u_idx.astype(np.int64) * len(item_vocab) + i_idx
    _, first, counts = np.unique(key, return_index=True, return_counts=True)
    if np.any(counts > 1):
        j = first[np.argmax(counts > 1)]
        raise ValueError(
            f"duplicate rating for user {u[j]} and item {i[j]} (first at position {j}); "
            "aggregate duplicates before fitting"
        )
    return Ratings(
        user_vocab=user_vocab,
        item_vocab=item_vocab.astype(np.int32),
        u=u_idx.astype(np.int32),
        i=i_idx.astype(np.int32),
        r=r,
    )


def lookup(vocab: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Map raw ids to dense indices of a sorted ``vocab``; jit/vmap friendly.

    Returns ``(idx, known)``: ``idx`` is a valid index (0 for unknown ids, so gathers stay in
    bounds) and ``known`` is True where the id is in the vocabulary.
    """
    ids = jnp.asarray(ids, jnp.int32)
    pos = jnp.clip(jnp.searchsorted(vocab, ids), 0, vocab.shape[0] - 1)
    known = vocab[pos] == ids
    return jnp.where(known, pos, 0).astype(jnp.int32), known


def check_predict_inputs(
    support_item, support_rating, support_mask, query_item, query_mask, user_ids
):
    """Validate and convert the ``predict`` arguments; returns them as jax arrays.

    Shapes must be ``[T, S]`` (support), ``[T, Q]`` (query) and ``[T]`` (user ids).
    """
    s_item = jnp.asarray(support_item)
    s_rat = jnp.asarray(support_rating, jnp.float32)
    s_mask = jnp.asarray(support_mask, jnp.float32)
    q_item = jnp.asarray(query_item)
    q_mask = jnp.asarray(query_mask, jnp.float32)
    users = jnp.asarray(user_ids)
    if s_item.ndim != 2 or s_rat.shape != s_item.shape or s_mask.shape != s_item.shape:
        raise ValueError(
            "support_item, support_rating, support_mask must share shape [T, S]; got "
            f"{tuple(s_item.shape)}, {tuple(s_rat.shape)}, {tuple(s_mask.shape)}"
        )
    if q_item.ndim != 2 or q_mask.shape != q_item.shape or q_item.shape[0] != s_item.shape[0]:
        raise ValueError(
            "query_item, query_mask must share shape [T, Q] with the support's T; got "
            f"{tuple(q_item.shape)}, {tuple(q_mask.shape)} (support T={s_item.shape[0]})"
        )
    if users.shape != (s_item.shape[0],):
        raise ValueError(f"user_ids must have shape [T]=({s_item.shape[0]},), got {users.shape}")
    for name, a in (("support_item", s_item), ("query_item", q_item)):
        if not jnp.issubdtype(a.dtype, jnp.integer):
            raise ValueError(f"{name} must hold integer raw item ids, got dtype {a.dtype}")
    return s_item.astype(jnp.int32), s_rat, s_mask, q_item.astype(jnp.int32), q_mask, users


def finish(pred: jax.Array, query_mask: jax.Array, r_min, r_max, clip: bool) -> jax.Array:
    """Optionally clip to ``[r_min, r_max]`` and zero the padded query slots."""
    pred = pred.astype(jnp.float32)
    if clip:
        pred = jnp.clip(pred, r_min, r_max)
    return jnp.where(query_mask > 0, pred, 0.0)


def support_mean(support_rating, support_mask, prior, pseudo_count):
    """Per-task support mean shrunk toward ``prior``: ``(sum r + c * prior) / (n + c)``.

    ``prior`` when the support is empty (and ``c == 0``). Shapes ``[..., S] -> [...]``.
    """
    m = support_mask > 0
    n = jnp.sum(m, axis=-1).astype(jnp.float32)
    s = jnp.sum(jnp.where(m, support_rating, 0.0), axis=-1)
    den = n + pseudo_count
    return jnp.where(den > 0, (s + pseudo_count * prior) / jnp.where(den > 0, den, 1.0), prior)


def _run_predict(core, hparams, clip, state, s_item, s_rat, s_mask, q_item, q_mask):
    pred = core(hparams, state, s_item, s_rat, s_mask, q_item, q_mask)
    return finish(pred, q_mask, state.r_min, state.r_max, clip)


# one jit for every baseline: ``core`` (a module-level function), ``hparams`` (a hashable tuple)
# and ``clip`` are static, so baselines rebuilt with equal settings reuse the compiled code.
_run_predict_jit = jax.jit(_run_predict, static_argnums=(0, 1, 2))


def make_predict(core: Callable, hparams: tuple, clip: bool, pad: bool = False) -> Callable:
    """Build the public ``predict`` from a module-level, jittable
    ``core(hparams, state, s_item, s_rat, s_mask, q_item, q_mask) -> [T, Q]``: input validation,
    one jit (static ``core``, ``hparams``, ``clip``), clipping to the state's rating range and
    0.0 at padded query slots.

    ``pad``: for a core whose per-task results depend neither on the other tasks nor on masked
    support slots, the tasks go through in blocks of ``PAD_TASKS`` (the last padded) with the
    support padded to a multiple of ``SUPPORT_MULTIPLE`` (masked), so that task sets of any size
    and support widths share one compiled program (not under an outer trace)."""
    hash(hparams)  # must be hashable (static jit argument)

    def predict(
        state, support_item, support_rating, support_mask, query_item, query_mask, user_ids
    ):
        args = check_predict_inputs(
            support_item, support_rating, support_mask, query_item, query_mask, user_ids
        )[:5]
        if not pad or any(isinstance(a, jax.core.Tracer) for a in args):
            return _run_predict_jit(core, hparams, bool(clip), state, *args)
        wide = -args[0].shape[1] % SUPPORT_MULTIPLE  # the support (first three) padded, masked
        args = [
            np.pad(np.asarray(a), ((0, 0), (0, wide))) if j < 3 else a for j, a in enumerate(args)
        ]
        return jnp.asarray(
            map_blocks(
                lambda *a: _run_predict_jit(core, hparams, bool(clip), state, *a),
                args,
                PAD_TASKS,
            )
        )

    return predict
