"""Per-user interaction sequences for masked-item pretraining.

A ratings frame -> :func:`build_sequences` (time-ordered, right-padded item/rating sequences per
user) -> :func:`holdout_split` (a validation subset of users whose last item is held out) ->
:func:`mask_items` (the masked positions and labels of one batch, a :class:`MaskedBatch`).

Item tokens are indices of the feature encoder's item vocabulary (``0`` = OOV); padding is
expressed by ``mask``, not by an item id (see :mod:`metarec.models.transformer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@flax.struct.dataclass
class Sequences:
    """Right-padded per-user histories: ``items [U, L] int32``, ``ratings [U, L] float32``,
    ``mask [U, L] float32`` (1 real, 0 padding) and ``user [U] int64`` (raw user ids)."""

    items: Any
    ratings: Any
    mask: Any
    user: Any

    @property
    def num_users(self) -> int:
        return self.items.shape[0]

    @property
    def length(self) -> int:
        return self.items.shape[1]

    def select(self, idx) -> Sequences:
        return jax.tree_util.tree_map(lambda a: a[idx], self)


def build_sequences(
    ratings,
    item_index: Callable[[np.ndarray], np.ndarray],
    max_len: int,
    drop_oov: bool = True,
) -> Sequences:
    """Time-ordered item sequences from a ratings frame.

    Args:
      ratings: pandas DataFrame with ``user_id``, ``item_id``, ``rating``, ``timestamp`` (e.g.
        ``metarec.data.scenarios`` training ratings: warm-train users x existing items only).
      item_index: maps raw item ids to vocabulary indices (``0`` = OOV), e.g.
        ``encoder.vocabs["item_id"].encode`` of a fitted
        :class:`metarec.data.encode.FeatureEncoder`, so that pretraining and the rater share one
        item indexing.
      max_len: keep the ``max_len`` most recent ratings of each user.
      drop_oov: drop ratings of items mapped to OOV (they carry no item identity).

    Ratings are ordered by (timestamp, item_id) per user; users are in increasing id order.
    """
    missing = {"user_id", "item_id", "rating", "timestamp"} - set(ratings.columns)
    if missing:
        raise ValueError(f"build_sequences: ratings frame lacks columns {sorted(missing)}")
    if max_len < 1:
        raise ValueError(f"build_sequences: max_len must be >= 1, got {max_len}")
    df = ratings[["user_id", "item_id", "rating", "timestamp"]].copy()
    df["idx"] = np.asarray(item_index(df["item_id"].to_numpy()), np.int64)
    if drop_oov:
        df = df[df["idx"] > 0]
    df = df.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    users = df["user_id"].to_numpy()
    uniq, start, counts = np.unique(users, return_index=True, return_counts=True)
    n_users = len(uniq)
    items = np.zeros((n_users, max_len), np.int32)
    rat = np.zeros((n_users, max_len), np.float32)
    mask = np.zeros((n_users, max_len), np.float32)
    idx = df["idx"].to_numpy()
    r = df["rating"].to_numpy(np.float32)
    for u, (s, c) in enumerate(zip(start, counts, strict=True)):
        keep = min(c, max_len)
        lo = s + c - keep
        items[u, :keep] = idx[lo : s + c]
        rat[u, :keep] = r[lo : s + c]
        mask[u, :keep] = 1.0
    return Sequences(items=items, ratings=rat, mask=mask, user=uniq.astype(np.int64))


def holdout_split(
    seqs: Sequences, val_fraction: float, seed: int, min_len: int = 3
) -> tuple[Sequences, Sequences]:
    """Split off a validation subset of users whose **last** item is held out.

    ``val_fraction`` of the users with at least ``min_len`` items are drawn with
    ``numpy.random.default_rng(seed)``.  Returns ``(train, val)``: ``train`` holds every user (the
    validation users without their last item), ``val`` the validation users' full sequences; their
    last real position is the next-item evaluation's target.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"holdout_split: val_fraction must be in [0, 1), got {val_fraction}")
    lengths = np.asarray(seqs.mask).sum(1).astype(int)
    eligible = np.flatnonzero(lengths >= min_len)
    n_val = int(round(val_fraction * len(eligible)))
    val_idx = np.sort(np.random.default_rng(seed).choice(eligible, n_val, replace=False))
    train = jax.tree_util.tree_map(np.array, seqs)
    last = lengths[val_idx] - 1
    train.items[val_idx, last] = 0
    train.ratings[val_idx, last] = 0.0
    train.mask[val_idx, last] = 0.0
    return train, seqs.select(val_idx)


@flax.struct.dataclass
class MaskedBatch:
    """Inputs and targets of the masked-item objective (all ``[B, L]``)."""

    items: Array  # input items, [MASK] at masked positions
    ratings: Array  # input ratings, 0 at masked positions
    mask: Array  # padding mask (unchanged)
    labels: Array  # original item at masked positions, 0 elsewhere
    label_mask: Array  # 1.0 at masked positions


def mask_items(
    key: Array,
    items: Array,
    ratings: Array,
    mask: Array,
    mask_prob: float,
    mask_token: int,
    last_prob: float = 0.0,
) -> MaskedBatch:
    """Choose masked positions for a batch of right-padded sequences ``[B, L]`` (pure, jittable).

    Each real position is masked independently with probability ``mask_prob``; a non-empty
    sequence with no masked position gets one uniformly chosen real position masked; with
    probability ``last_prob`` a sequence instead has exactly its last real position masked.
    Padding is never masked; labels are non-zero only at masked positions. Masked positions also
    lose their rating (token 0 = unknown).
    """
    k1, k2, k3 = jax.random.split(key, 3)
    real = mask > 0
    n = real.sum(-1)
    chosen = (jax.random.uniform(k1, items.shape) < mask_prob) & real
    # Guarantee one masked position: pick a uniform real position (Gumbel-style argmax on noise).
    noise = jnp.where(real, jax.random.uniform(k2, items.shape), -1.0)
    one = jax.nn.one_hot(jnp.argmax(noise, -1), items.shape[-1], dtype=bool) & real
    chosen = jnp.where(chosen.any(-1, keepdims=True), chosen, one)
    last = jax.nn.one_hot(jnp.maximum(n - 1, 0), items.shape[-1], dtype=bool) & real
    use_last = jax.random.uniform(k3, items.shape[:-1] + (1,)) < last_prob
    chosen = jnp.where(use_last, last, chosen)
    return MaskedBatch(
        items=jnp.where(chosen, mask_token, items).astype(jnp.int32),
        ratings=jnp.where(chosen, 0.0, ratings),
        mask=mask,
        labels=jnp.where(chosen, items, 0).astype(jnp.int32),
        label_mask=chosen.astype(jnp.float32),
    )


__all__ = ["MaskedBatch", "Sequences", "build_sequences", "holdout_split", "mask_items"]
