"""Next-item evaluation of a history encoder over the full item catalogue.

* :func:`evaluate_next_item`: held-out last item of pretraining's validation users
  (:func:`metarec.data.sequences.holdout_split`);
* :func:`support_ranking`: a cold-start task's query items ranked from its support history;
* :func:`popularity_ranking`: the same relevance ranked by training popularity (the reference).

All report :func:`metarec.metrics.ranking_metrics` averaged over users.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metarec.data.sequences import Sequences
from metarec.metrics import ranking_metrics
from metarec.models.transformer import NEG, EncoderConfig, next_item_logits


def exclude_items(logits: jax.Array, items: jax.Array, mask: jax.Array) -> jax.Array:
    """``logits`` ``[B, V]`` with the items of each row's history (``items`` ``[B, L]`` where
    ``mask > 0``) set to :data:`~metarec.models.transformer.NEG`, so they cannot be ranked."""
    rows = jnp.arange(items.shape[0])[:, None]
    seen = jnp.zeros_like(logits, bool).at[rows, items].max(mask > 0)
    return jnp.where(seen, NEG, logits)


def evaluate_next_item(
    params,
    config: EncoderConfig,
    val: Sequences,
    k: int = 10,
    exclude_seen: bool = True,
    batch_size: int = 256,
) -> dict[str, float]:
    """Held-out next-item metrics: each validation sequence's last real item is the target, the
    items before it the input; the whole catalogue is ranked (items already in the input history are
    excluded when ``exclude_seen``, as MovieLens users rate an item once).  Returns means of
    ``hr@k``, ``recall@k`` (= hr@k with one target), ``ndcg@k`` and ``acc`` (top-1) plus ``n``."""
    items, ratings, mask = (np.asarray(a) for a in (val.items, val.ratings, val.mask))
    n = mask.sum(1).astype(int)
    rows = np.arange(len(n))
    if np.any(n < 2):
        raise ValueError("evaluate_next_item: every validation sequence needs >= 2 items")
    target = items[rows, n - 1]
    inp_mask = mask.copy()
    inp_mask[rows, n - 1] = 0.0
    inp_items = items * inp_mask.astype(items.dtype)
    inp_r = ratings * inp_mask
    V1 = config.num_items + 1

    @jax.jit
    def score(it, rt, mk, tg):
        logits = next_item_logits(params, config, it, rt, mk)
        if exclude_seen:
            logits = exclude_items(logits, it, mk)
        rel = jax.nn.one_hot(tg, V1, dtype=bool)
        return ranking_metrics(logits, rel, k)

    out: dict[str, list] = {}
    for s in range(0, len(n), batch_size):
        sl = slice(s, s + batch_size)
        m = score(inp_items[sl], inp_r[sl], inp_mask[sl], target[sl])
        for key, v in m.items():
            out.setdefault(key, []).append(np.asarray(v))
    res = {key: float(np.concatenate(v).mean()) for key, v in out.items()}
    res["n"] = int(len(n))
    return res


def _query_relevance(tasks, n_tokens: int) -> np.ndarray:
    """``[T, n_tokens]`` bool: each task's real query items with a known (non-OOV) index."""
    q_items = np.asarray(tasks.query.x["item"][..., 1])
    q_mask = np.asarray(tasks.query.mask) > 0
    n_tasks = len(q_items)
    rel = np.zeros((n_tasks, n_tokens), bool)
    rows = np.repeat(np.arange(n_tasks), q_items.shape[1])
    ok = q_mask.reshape(-1) & (q_items.reshape(-1) > 0)
    rel[rows[ok], q_items.reshape(-1)[ok]] = True
    return rel


def support_ranking(
    params,
    config: EncoderConfig,
    tasks,
    k: int = 10,
    exclude_support: bool = True,
    batch_size: int = 128,
) -> dict[str, float]:
    """Full-catalogue ranking of each task's query items from its support history (the masked-item
    head scores the item after the history; tasks must carry ``x["hist_*"]`` from
    :func:`metarec.models.transformer.add_history`).

    Relevant = the task's real query items with a known (non-OOV) index; tasks without one are
    skipped.  Support items are excluded from the ranking.  Returns mean ``hr@k``, ``recall@k``,
    ``ndcg@k`` over the evaluated users and ``n``.
    """
    hi = np.asarray(tasks.query.x["hist_item"][:, 0])
    hr = np.asarray(tasks.query.x["hist_rating"][:, 0])
    hm = np.asarray(tasks.query.x["hist_mask"][:, 0])
    if hi.shape[1] > config.max_len:
        raise ValueError(f"history length {hi.shape[1]} > encoder max_len {config.max_len}")
    rel = _query_relevance(tasks, config.num_items + 1)
    keep = rel.any(1)

    @jax.jit
    def score(it, rt, mk, rl):
        logits = next_item_logits(params, config, it, rt, mk)
        if exclude_support:
            logits = exclude_items(logits, it, mk)
        return ranking_metrics(logits, rl, k)

    idx = np.flatnonzero(keep)
    out: dict[str, list] = {}
    for s in range(0, len(idx), batch_size):
        sl = idx[s : s + batch_size]
        pad = batch_size - len(sl)
        sl_p = np.concatenate([sl, np.repeat(sl[:1], pad)])
        m = score(hi[sl_p], hr[sl_p], hm[sl_p], rel[sl_p])
        for key, v in m.items():
            out.setdefault(key, []).append(np.asarray(v)[: len(sl)])
    res = {key: float(np.concatenate(v).mean()) for key, v in out.items() if key != "acc"}
    res["n"] = int(len(idx))
    return res


def popularity_ranking(train_ratings, encoder, tasks, k: int = 10) -> dict[str, float]:
    """Reference ranking: items by training popularity (support items excluded); same relevance and
    metrics as :func:`support_ranking`."""
    V1 = encoder.spec.item_vocab[1]
    idx = encoder.vocabs["item_id"].encode(train_ratings["item_id"].to_numpy())
    pop = np.bincount(idx, minlength=V1).astype(np.float32)
    pop[0] = NEG
    hi = np.asarray(tasks.query.x["hist_item"][:, 0])
    hm = np.asarray(tasks.query.x["hist_mask"][:, 0])
    scores = np.broadcast_to(pop, (len(hi), V1)).copy()
    r = np.repeat(np.arange(len(hi)), hi.shape[1])
    scores[r[hm.reshape(-1) > 0], hi.reshape(-1)[hm.reshape(-1) > 0]] = NEG
    rel = _query_relevance(tasks, V1)
    keep = rel.any(1)
    m = ranking_metrics(jnp.asarray(scores[keep]), jnp.asarray(rel[keep]), k)
    res = {key: float(np.mean(v)) for key, v in m.items() if key != "acc"}
    res["n"] = int(keep.sum())
    return res


__all__ = ["evaluate_next_item", "exclude_items", "popularity_ranking", "support_ranking"]
