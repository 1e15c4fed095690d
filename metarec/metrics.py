"""Evaluation metrics: masked, vectorised, and safe under ``jax.jit`` and ``jax.vmap``.

Three groups of functions:

1. **Per-task (query-set) metrics.** Arguments are 1-D arrays ``pred [Q]`` (predicted scores or
   ratings), ``true [Q]`` (true ratings) and ``mask [Q]`` (1.0 real, 0.0 padding). Padded entries
   never change a value. Metrics that are undefined for some tasks return a pair
   ``(value, valid)`` where ``valid`` is 1.0 when the metric is defined and 0.0 otherwise (``value``
   is then 0.0); averages over users must skip invalid tasks, which :func:`batched` and
   :func:`per_task_metrics` + :func:`summarize` do by multiplying the task weight with ``valid``.

   ========================== ============================ ==============================
   function                   returns                      undefined (valid = 0) when
   ========================== ============================ ==============================
   :func:`mae`                value                        (never; no real entry -> 0.0)
   :func:`rmse`               value                        (never; no real entry -> 0.0)
   :func:`ndcg_at_k`          (value, valid)               ideal DCG == 0 (no positive gain)
   :func:`expected_random_ndcg_at_k` (value, valid)        same as :func:`ndcg_at_k`
   :func:`precision_at_k`     (value, valid)               no real entry
   :func:`query_recall_at_k`  (value, valid)               no relevant entry
   :func:`f1_at_k`            (value, valid)               no relevant entry
   :func:`auc`                (value, valid)               no relevant or no non-relevant entry
   ========================== ============================ ==============================

   Ranking is always by ``pred`` descending with ties broken by the given query order (a STABLE
   sort), as the cold-start protocol prescribes; the ideal order is by ``true`` descending.
   ``k`` may be a Python int or a traced integer (no ``lax.top_k`` is used).

2. **Batched wrappers and summaries.** :func:`batched` turns any per-task metric into a function
   of ``[T, Q]`` arrays and a per-task weight ``[T]`` (0.0 for padded tasks) that returns the
   weighted mean over valid tasks; ``batch_mae``, ``batch_rmse``, ``batch_ndcg_at_k``, ... are
   ready-made. :func:`per_task_metrics` returns every metric per task (for accumulating over
   several evaluation batches), :func:`summarize` averages them, :func:`mean_std_over_seeds` gives
   the ``{"mean", "std"}`` entries of ``results.json``.

3. **Full-catalogue metrics for next-item prediction.** ``scores [N]`` over the whole item
   catalogue, an ``exclude [N]`` boolean mask (already-seen items, catalogue padding) and one
   target item (:func:`hit_rate_at_k`, :func:`ndcg_at_k_single_target`) or several
   (:func:`recall_at_k`). Ties are broken by item index (stable) by default, or pessimistically
   (``ties="pessimistic"``: the target is placed after every candidate with an equal score, so a
   constant scorer earns nothing from ties). :func:`ranking_metrics` scores a whole batch
   ``scores [B, N]`` against a relevance matrix ``[B, N]`` with one ``lax.top_k`` (ties by item
   index) and returns HR@k, recall@k, nDCG@k and top-1 accuracy per row.

Naming note: ``recall_at_k`` is the full-catalogue recall (hits / #targets); ``ranking_metrics``'
``recall@k`` divides by ``min(k, #relevant)`` so that a perfect top-k scores 1; the query-set recall
is ``query_recall_at_k``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "mae",
    "rmse",
    "dcg_at_k",
    "ndcg_at_k",
    "expected_random_ndcg_at_k",
    "precision_at_k",
    "query_recall_at_k",
    "f1_at_k",
    "auc",
    "batched",
    "batch_mae",
    "batch_rmse",
    "batch_ndcg_at_k",
    "batch_expected_random_ndcg_at_k",
    "batch_precision_at_k",
    "batch_query_recall_at_k",
    "batch_f1_at_k",
    "batch_auc",
    "per_task_metrics",
    "summarize",
    "mean_std_over_seeds",
    "hit_rate_at_k",
    "ndcg_at_k_single_target",
    "recall_at_k",
    "ranking_metrics",
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _prep(pred, true, mask):
    pred = jnp.asarray(pred, jnp.float32)
    true = jnp.asarray(true, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32) > 0
    if pred.ndim != 1 or pred.shape != true.shape or pred.shape != mask.shape:
        raise ValueError(
            "per-task metrics take 1-D pred, true, mask of equal shape [Q]; got "
            f"pred{tuple(pred.shape)}, true{tuple(true.shape)}, mask{tuple(mask.shape)} "
            "(use the batch_* wrappers or jax.vmap for a leading task axis)"
        )
    return pred, true, mask


def _safe_div(num, den):
    """num / den, 0.0 where den == 0 (no NaN, also in gradients)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _rank_order(pred, mask):
    """Indices of the real entries sorted by ``pred`` descending, stable; padding goes last."""
    key = jnp.where(mask, -pred, jnp.inf)
    return jnp.argsort(key, stable=True)


def _discounts(n, k):
    """``1/log2(rank+1)`` for 1-based ranks 1..n, zeroed beyond rank k."""
    rank = jnp.arange(1, n + 1, dtype=jnp.float32)
    return jnp.where(rank <= k, 1.0 / jnp.log2(rank + 1.0), 0.0)


def _gain(true):
    return jnp.exp2(true) - 1.0


# ----------------------------------------------------------------------------------------------
# per-task query-set metrics
# ----------------------------------------------------------------------------------------------


def mae(pred, true, mask):
    """Mean absolute error over the real entries; 0.0 if there are none."""
    pred, true, mask = _prep(pred, true, mask)
    return _safe_div(jnp.sum(jnp.where(mask, jnp.abs(pred - true), 0.0)), jnp.sum(mask))


def rmse(pred, true, mask):
    """Root mean squared error of ONE task (the protocol averages per-user RMSEs afterwards).

    0.0 if there is no real entry.
    """
    pred, true, mask = _prep(pred, true, mask)
    mse = _safe_div(jnp.sum(jnp.where(mask, jnp.square(pred - true), 0.0)), jnp.sum(mask))
    return jnp.sqrt(mse)


def dcg_at_k(pred, true, mask, k):
    """DCG@k = sum over the top-k real entries ranked by ``pred`` (descending, stable: ties keep
    the given query order) of ``(2**true - 1) / log2(rank + 1)``, rank 1-based."""
    pred, true, mask = _prep(pred, true, mask)
    order = _rank_order(pred, mask)
    gains = jnp.where(mask, _gain(true), 0.0)[order]
    return jnp.sum(gains * _discounts(pred.shape[0], k))


def _ideal_dcg(true, mask, k):
    order = _rank_order(true, mask)
    gains = jnp.where(mask, _gain(true), 0.0)[order]
    return jnp.sum(gains * _discounts(true.shape[0], k))


def ndcg_at_k(pred, true, mask, k):
    """nDCG@k within the query set; returns ``(ndcg, valid)``.

    ``ndcg = DCG@k(pred) / DCG@k(ideal)`` with gain ``2**r - 1``, discount ``1/log2(rank + 1)``,
    the ranking by ``pred`` descending with ties broken by the given query order (stable sort) and
    the ideal ranking by ``true`` descending. If fewer than ``k`` entries are real, only those
    count.

    A task whose ideal DCG is 0 (no real entry with a positive gain, i.e. every real rating <= 0)
    has no meaningful nDCG: it returns ``(0.0, 0.0)`` and must be EXCLUDED from averages (the
    batched wrappers do this via the validity flag). 0 <= ndcg <= 1 always.
    """
    pred, true, mask = _prep(pred, true, mask)
    dcg = dcg_at_k(pred, true, mask, k)
    idcg = _ideal_dcg(true, mask, k)
    valid = idcg > 0
    return _safe_div(dcg, idcg), valid.astype(jnp.float32)


def expected_random_ndcg_at_k(true, mask, k):
    """Exact expected nDCG@k of a uniformly random ranking of the real entries; ``(value, valid)``.

    With ``n`` real entries, a random permutation puts every item at every rank with probability
    ``1/n``, so by linearity of expectation::

        E[DCG@k] = sum_{r=1}^{min(k, n)} mean_i(2**true_i - 1) / log2(r + 1)

    and, the ideal DCG being constant, ``E[nDCG@k] = E[DCG@k] / IDCG@k``. Validity as in
    :func:`ndcg_at_k`.
    """
    true = jnp.asarray(true, jnp.float32)
    _, true, mask = _prep(true, true, mask)
    n = jnp.sum(mask)
    mean_gain = _safe_div(jnp.sum(jnp.where(mask, _gain(true), 0.0)), n)
    rank = jnp.arange(1, true.shape[0] + 1, dtype=jnp.float32)
    disc = jnp.where((rank <= k) & (rank <= n), 1.0 / jnp.log2(rank + 1.0), 0.0)
    edcg = mean_gain * jnp.sum(disc)
    idcg = _ideal_dcg(true, mask, k)
    valid = idcg > 0
    return _safe_div(edcg, idcg), valid.astype(jnp.float32)


def _topk_hits(pred, true, mask, k, threshold):
    """(#relevant among the top-k real entries, #entries in the top-k, #relevant, relevant mask)."""
    order = _rank_order(pred, mask)
    rel = mask & (true >= threshold)
    in_topk = (jnp.arange(pred.shape[0]) < k) & mask[order]
    hits = jnp.sum(in_topk & rel[order])
    return hits.astype(jnp.float32), jnp.sum(in_topk).astype(jnp.float32), jnp.sum(rel), rel


def precision_at_k(pred, true, mask, k, threshold=4.0):
    """Precision@k: fraction of the top-``min(k, n_real)`` entries (ranked by ``pred``, stable)
    that are relevant (``true >= threshold``). Returns ``(value, valid)``; invalid if no real entry.
    """
    pred, true, mask = _prep(pred, true, mask)
    hits, n_top, _, _ = _topk_hits(pred, true, mask, k, threshold)
    return _safe_div(hits, n_top), (n_top > 0).astype(jnp.float32)


def query_recall_at_k(pred, true, mask, k, threshold=4.0):
    """Recall@k within the query set: relevant entries (``true >= threshold``) found in the top-k
    by ``pred`` (stable) over all relevant entries. ``(value, valid)``; invalid with no relevant
    entry.
    """
    pred, true, mask = _prep(pred, true, mask)
    hits, _, n_rel, _ = _topk_hits(pred, true, mask, k, threshold)
    return _safe_div(hits, n_rel), (n_rel > 0).astype(jnp.float32)


def f1_at_k(pred, true, mask, k, threshold=4.0):
    """F1@k = 2 P R / (P + R) of :func:`precision_at_k` and :func:`query_recall_at_k` (0.0 when
    P + R = 0). ``(value, valid)``; invalid with no relevant entry (recall undefined)."""
    pred, true, mask = _prep(pred, true, mask)
    hits, n_top, n_rel, _ = _topk_hits(pred, true, mask, k, threshold)
    p = _safe_div(hits, n_top)
    r = _safe_div(hits, n_rel)
    return _safe_div(2.0 * p * r, p + r), (n_rel > 0).astype(jnp.float32)


def auc(pred, true, mask, threshold=4.0):
    """ROC AUC within the query set: the fraction of (relevant, non-relevant) pairs of real entries
    where the relevant one scores higher; ties count 1/2. Relevant means ``true >= threshold``.
    ``(value, valid)``; invalid if there is no relevant or no non-relevant real entry.
    """
    pred, true, mask = _prep(pred, true, mask)
    rel = mask & (true >= threshold)
    non = mask & (true < threshold)
    diff = pred[:, None] - pred[None, :]
    score = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
    pairs = rel[:, None] & non[None, :]
    n_pairs = jnp.sum(pairs).astype(jnp.float32)
    return _safe_div(jnp.sum(jnp.where(pairs, score, 0.0)), n_pairs), (n_pairs > 0).astype(
        jnp.float32
    )


# ----------------------------------------------------------------------------------------------
# batched wrappers and summaries
# ----------------------------------------------------------------------------------------------


def summarize(metric_values, weights=None):
    """Weighted mean over users: ``sum(w * v) / sum(w)``.

    ``weights`` defaults to all ones; pass ``task_weight * valid`` to skip padded tasks and tasks
    where a metric is undefined (entries with weight 0 never contribute, even if their value is
    NaN). Returns NaN when no entry has positive weight. Works on host or under jit.
    """
    v = jnp.asarray(metric_values, jnp.float32)
    w = jnp.ones_like(v) if weights is None else jnp.asarray(weights, jnp.float32)
    if v.shape != w.shape:
        raise ValueError(f"summarize: values{tuple(v.shape)} and weights{tuple(w.shape)} differ")
    wsum = jnp.sum(w)
    total = jnp.sum(jnp.where(w != 0, w * v, 0.0))
    return jnp.where(wsum > 0, total / jnp.where(wsum > 0, wsum, 1.0), jnp.nan)


def mean_std_over_seeds(values: Sequence[float]) -> dict:
    """``{"mean": ..., "std": ...}`` over seeds (host-side) with the SAMPLE std (ddof=1).

    One seed gives std 0.0; an empty list raises ``ValueError``.
    """
    vals = np.asarray([float(v) for v in values], dtype=np.float64)
    if vals.size == 0:
        raise ValueError("mean_std_over_seeds needs at least one value")
    std = float(np.std(vals, ddof=1)) if vals.size > 1 else 0.0
    return {"mean": float(np.mean(vals)), "std": std}


@functools.lru_cache(maxsize=256)
def _batched_jit(metric_fn, static_kwargs):
    kwargs = dict(static_kwargs)

    def run(arrays, weights):
        out = jax.vmap(lambda *a: metric_fn(*a, **kwargs))(*arrays)
        if isinstance(out, tuple):
            value, valid = out
        else:
            value, valid = out, jnp.ones_like(out)
        w = jnp.ones_like(value) if weights is None else jnp.asarray(weights, jnp.float32)
        return summarize(value, w * valid)

    return jax.jit(run)


def batched(metric_fn: Callable, *, n_arrays: int = 3) -> Callable:
    """Lift a per-task metric to a batch ``[T, Q]`` with per-task weights ``[T]``.

    The returned function is ``f(*arrays, weights=None, **kwargs) -> scalar`` (``weights`` may
    also be passed as the last positional argument): it vmaps ``metric_fn`` over the leading task
    axis of its first ``n_arrays`` positional arguments (keyword arguments such as ``k`` and
    ``threshold`` are shared by all tasks and must be hashable Python values; they are static to
    the jit) and returns :func:`summarize` of the per-task values with weight ``weights * valid``
    (``valid`` = 1 for metrics that return a plain value). Padded tasks should get weight 0.
    Usable inside an outer ``jax.jit``.
    """

    def wrapper(*arrays, weights=None, **kwargs):
        if len(arrays) == n_arrays + 1 and weights is None:
            *arrays, weights = arrays
        if len(arrays) != n_arrays:
            raise TypeError(
                f"expected {n_arrays} array arguments (+ optional weights), got {len(arrays)}"
            )
        return _batched_jit(metric_fn, tuple(sorted(kwargs.items())))(tuple(arrays), weights)

    wrapper.__name__ = f"batch_{getattr(metric_fn, '__name__', 'metric')}"
    wrapper.__doc__ = (
        f"Batched :func:`{getattr(metric_fn, '__name__', 'metric')}`: arrays with a leading task "
        "axis, optional per-task ``weights``; weighted mean over valid tasks."
    )
    return wrapper


batch_mae = batched(mae)
batch_rmse = batched(rmse)
batch_ndcg_at_k = batched(ndcg_at_k)
batch_expected_random_ndcg_at_k = batched(expected_random_ndcg_at_k, n_arrays=2)
batch_precision_at_k = batched(precision_at_k)
batch_query_recall_at_k = batched(query_recall_at_k)
batch_f1_at_k = batched(f1_at_k)
batch_auc = batched(auc)


@functools.partial(jax.jit, static_argnames=("k",))
def per_task_metrics(pred, true, mask, k: int = 3, threshold: float = 4.0, rank_scores=None):
    """Every query-set metric for a batch of tasks ``[T, Q]``; jit/vmap friendly.

    The error metrics (MAE, RMSE) use ``pred``; the ranking metrics (nDCG, precision, recall, F1,
    AUC) rank by ``rank_scores`` (default ``pred``). Pass the raw scores there when ``pred`` is
    clipped to the rating scale: clipping ties items the model ranked apart.

    Returns ``(values, valid)``: two dicts with the same keys ``mae, rmse, ndcg@k, random_ndcg@k,
    precision@k, recall@k, f1@k, auc`` (``k`` substituted; recall is :func:`query_recall_at_k`),
    each ``[T]``. ``k`` must be a Python int here (it names the keys; static under the built-in
    jit). Combine several evaluation
    batches by concatenating, then ``summarize(values[m], task_weight * valid[m])``.
    """
    k = int(k)

    def one(p, r, t, m):
        vals, ok = {}, {}
        one_ = jnp.float32(1.0)
        vals["mae"], ok["mae"] = mae(p, t, m), one_
        vals["rmse"], ok["rmse"] = rmse(p, t, m), one_
        vals[f"ndcg@{k}"], ok[f"ndcg@{k}"] = ndcg_at_k(r, t, m, k)
        vals[f"random_ndcg@{k}"], ok[f"random_ndcg@{k}"] = expected_random_ndcg_at_k(t, m, k)
        vals[f"precision@{k}"], ok[f"precision@{k}"] = precision_at_k(r, t, m, k, threshold)
        vals[f"recall@{k}"], ok[f"recall@{k}"] = query_recall_at_k(r, t, m, k, threshold)
        vals[f"f1@{k}"], ok[f"f1@{k}"] = f1_at_k(r, t, m, k, threshold)
        vals["auc"], ok["auc"] = auc(r, t, m, threshold)
        return vals, ok

    pred = jnp.asarray(pred, jnp.float32)
    rank = pred if rank_scores is None else jnp.asarray(rank_scores, jnp.float32)
    if pred.ndim != 2 or rank.shape != pred.shape:
        raise ValueError(
            f"per_task_metrics takes [T, Q] arrays, got pred{tuple(pred.shape)}, "
            f"rank_scores{tuple(rank.shape)}"
        )
    true, mask = jnp.asarray(true, jnp.float32), jnp.asarray(mask, jnp.float32)
    return jax.vmap(one)(pred, rank, true, mask)


# ----------------------------------------------------------------------------------------------
# full-catalogue ranking metrics (next-item prediction)
# ----------------------------------------------------------------------------------------------

_TIES = ("stable", "pessimistic")


def _candidate_ranks(scores, candidates, ties):
    """0-based rank of every item among the candidates, by score descending.

    ``ties="stable"``: equal scores are ordered by item index. ``ties="pessimistic"``: an item is
    ranked after every other candidate with an equal score. Ranks of non-candidates are meaningless.
    """
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")
    n = scores.shape[0]
    if ties == "stable":
        key = jnp.where(candidates, -scores, jnp.inf)
        order = jnp.argsort(key, stable=True)
        return jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    # pessimistic: rank = #{other candidates with score >= own score}
    asc = jnp.sort(jnp.where(candidates, scores, -jnp.inf))
    count_ge = n - jnp.searchsorted(asc, scores, side="left")
    return (count_ge - 1).astype(jnp.int32)


def _prep_catalogue(scores, exclude):
    scores = jnp.asarray(scores, jnp.float32)
    if scores.ndim != 1:
        raise ValueError(f"catalogue metrics take 1-D scores [N], got {tuple(scores.shape)} (vmap)")
    exclude = (
        jnp.zeros(scores.shape, bool) if exclude is None else jnp.asarray(exclude).astype(bool)
    )
    if exclude.shape != scores.shape:
        raise ValueError(f"exclude{tuple(exclude.shape)} must match scores{tuple(scores.shape)}")
    return scores, exclude


def hit_rate_at_k(scores, target, exclude=None, k: int = 10, ties: str = "stable"):
    """1.0 if the single held-out ``target`` item is among the top-k of the catalogue, else 0.0.

    ``scores [N]`` for every item, ``target`` an int item index, ``exclude [N]`` True for items
    removed from the candidate list (already-seen items, catalogue padding); the target itself is
    always a candidate even if marked excluded. Ties: see module docstring.
    """
    scores, exclude = _prep_catalogue(scores, exclude)
    target = jnp.asarray(target, jnp.int32)
    cand = (~exclude) | (jnp.arange(scores.shape[0]) == target)
    rank = _candidate_ranks(scores, cand, ties)[target]
    return (rank < k).astype(jnp.float32)


def ndcg_at_k_single_target(scores, target, exclude=None, k: int = 10, ties: str = "stable"):
    """nDCG@k with one relevant item: ``1/log2(rank + 2)`` for a 0-based rank < k, else 0.0.

    Same arguments as :func:`hit_rate_at_k` (the ideal DCG is 1).
    """
    scores, exclude = _prep_catalogue(scores, exclude)
    target = jnp.asarray(target, jnp.int32)
    cand = (~exclude) | (jnp.arange(scores.shape[0]) == target)
    rank = _candidate_ranks(scores, cand, ties)[target].astype(jnp.float32)
    return jnp.where(rank < k, 1.0 / jnp.log2(rank + 2.0), 0.0)


def recall_at_k(scores, targets, exclude=None, k: int = 10, ties: str = "stable"):
    """Full-catalogue recall@k: fraction of held-out target items in the top-k; ``(value, valid)``.

    ``targets`` is either a boolean mask ``[N]`` over the catalogue or an int array ``[M]`` of item
    indices padded with -1. Targets are always candidates; other ``exclude``-d items are removed.
    Other targets count as competitors (a target is a hit when fewer than k candidates rank above
    it). Invalid (``valid = 0``) when there is no target. With one target this equals
    :func:`hit_rate_at_k`.
    """
    scores, exclude = _prep_catalogue(scores, exclude)
    n = scores.shape[0]
    targets = jnp.asarray(targets)
    if targets.dtype == jnp.bool_:
        if targets.shape != scores.shape:
            raise ValueError(f"bool targets{tuple(targets.shape)} must match scores{(n,)}")
        tmask = targets
    elif jnp.issubdtype(targets.dtype, jnp.integer):
        if targets.ndim != 1:
            raise ValueError(f"int targets must be 1-D item indices, got {tuple(targets.shape)}")
        real = targets >= 0
        tmask = jnp.zeros((n,), bool).at[jnp.where(real, targets, n)].set(True, mode="drop")
    else:
        raise ValueError(f"targets must be bool [N] or int [M], got dtype {targets.dtype}")
    cand = (~exclude) | tmask
    ranks = _candidate_ranks(scores, cand, ties)
    n_t = jnp.sum(tmask).astype(jnp.float32)
    hits = jnp.sum(tmask & (ranks < k)).astype(jnp.float32)
    return _safe_div(hits, n_t), (n_t > 0).astype(jnp.float32)


def ranking_metrics(scores, relevant, k: int = 10) -> dict[str, jax.Array]:
    """Per-row full-catalogue ranking metrics from ``scores [B, N]`` and binary ``relevant [B, N]``.

    ``hr@k`` (any relevant item in the top k), ``recall@k`` (relevant in top k / min(k, #relevant)),
    ``ndcg@k`` (binary gain, ``1/log2(rank+1)`` discount, ideal = all relevant first) and ``acc``
    (top-1 is relevant).  Ties are broken by the lower item index (``lax.top_k``).  Rows with no
    relevant item give 0.  Items that must not be ranked (already seen, invalid tokens) are given a
    very low score by the caller.
    """
    _, top = jax.lax.top_k(scores, k)
    hits = jnp.take_along_axis(relevant.astype(jnp.float32), top, axis=-1)  # [B, k]
    n_rel = relevant.sum(-1).astype(jnp.float32)
    disc = 1.0 / jnp.log2(jnp.arange(2, k + 2, dtype=jnp.float32))
    dcg = (hits * disc).sum(-1)
    idcg = jnp.cumsum(disc)[jnp.clip(jnp.minimum(n_rel, k).astype(jnp.int32) - 1, 0, k - 1)]
    safe = n_rel > 0
    return {
        f"hr@{k}": (hits.sum(-1) > 0).astype(jnp.float32),
        f"recall@{k}": jnp.where(safe, hits.sum(-1) / jnp.maximum(jnp.minimum(n_rel, k), 1.0), 0.0),
        f"ndcg@{k}": jnp.where(safe, dcg / idcg, 0.0),
        "acc": hits[:, 0],
    }
