"""Two-tower retrieval model: ``score(u, i) = <user_tower(u), item_tower(i)>``.

Each tower embeds a row of categorical features (``[.., F]`` int ids, one embedding table per field,
index 0 = OOV) and optionally a dense vector (``[.., D]``: for users e.g. the Transformer history
summary; for items the multi-hot genres and/or precomputed content embeddings from
:mod:`metarec.models.content`), then applies an MLP.  Training uses implicit positives ``(user row,
item row)`` with uniformly sampled negative items and either the BPR loss or a sampled softmax.

Users and items are given as *tables* (one row per user / item) plus integer row indices, so a
training step only moves indices; everything is jittable. The training loop (one ``lax.scan`` per
epoch) is :func:`metarec.training.two_tower.train_two_tower`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Tower(nn.Module):
    """Categorical fields (+ optional dense input) -> MLP -> ``out_dim`` vector."""

    vocab: tuple[int, ...]
    embed_dim: int = 32
    hidden: tuple[int, ...] = (64,)
    out_dim: int = 32

    @nn.compact
    def __call__(self, cat: Array, dense: Array | None = None) -> Array:
        parts = [
            nn.Embed(v, self.embed_dim, name=f"embed_{j}")(cat[..., j])
            for j, v in enumerate(self.vocab)
        ]
        if dense is not None:
            parts.append(nn.Dense(self.embed_dim, name="dense_in")(dense.astype(jnp.float32)))
        z = jnp.concatenate(parts, -1)
        for k, w in enumerate(self.hidden):
            z = nn.relu(nn.Dense(w, name=f"mlp_{k}")(z))
        return nn.Dense(self.out_dim, name="out")(z)


class TwoTower(nn.Module):
    """``user(cat, dense) -> [.., d]``, ``item(cat, dense) -> [.., d]``; ``__call__``: their dot
    product."""

    user_vocab: tuple[int, ...]
    item_vocab: tuple[int, ...]
    embed_dim: int = 32
    hidden: tuple[int, ...] = (64,)
    out_dim: int = 32

    def setup(self):
        sizes = (self.embed_dim, self.hidden, self.out_dim)
        self.user_tower = Tower(self.user_vocab, *sizes, name="user_tower")
        self.item_tower = Tower(self.item_vocab, *sizes, name="item_tower")

    def user(self, cat, dense=None):
        return self.user_tower(cat, dense)

    def item(self, cat, dense=None):
        return self.item_tower(cat, dense)

    def __call__(self, user_cat, item_cat, user_dense=None, item_dense=None):
        return jnp.sum(self.user(user_cat, user_dense) * self.item(item_cat, item_dense), -1)


@flax.struct.dataclass
class Tables:
    """Feature tables: ``user_cat [U, Fu]``, ``user_dense [U, Du] | None``, ``item_cat [I, Fi]``,
    ``item_dense [I, Di] | None``."""

    user_cat: Any
    item_cat: Any
    user_dense: Any = None
    item_dense: Any = None


def bpr_loss(pos: Array, neg: Array) -> Array:
    """Bayesian personalised ranking: ``mean -log sigmoid(s_pos - s_neg)`` over ``[B, K]``
    negatives."""
    return -jnp.mean(jax.nn.log_sigmoid(pos[:, None] - neg))


def sampled_softmax(pos: Array, neg: Array, hit: Array) -> Array:
    """Softmax of the positive against ``[B, K]`` sampled negatives (accidental hits masked)."""
    logits = jnp.concatenate([pos[:, None], jnp.where(hit, -1e9, neg)], -1)
    return -jnp.mean(jax.nn.log_softmax(logits, -1)[:, 0])


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig:
    """Model and training hyper-parameters (training: :mod:`metarec.training.two_tower`)."""

    embed_dim: int = 32
    hidden: tuple[int, ...] = (64,)
    out_dim: int = 32
    loss: str = "bpr"  # or "softmax"
    num_negatives: int = 8
    batch_size: int = 256
    epochs: int = 20
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        if self.loss not in ("bpr", "softmax"):
            raise ValueError(f"TwoTowerConfig.loss must be 'bpr' or 'softmax', got {self.loss!r}")
        if self.num_negatives < 1:
            raise ValueError(f"TwoTowerConfig.num_negatives must be >= 1, got {self.num_negatives}")


def make_model(tables: Tables, cfg: TwoTowerConfig) -> TwoTower:
    """Size the towers from the tables (vocab of each field = max id + 1)."""
    uv = tuple(int(v) + 1 for v in np.asarray(tables.user_cat).max(0))
    iv = tuple(int(v) + 1 for v in np.asarray(tables.item_cat).max(0))
    return TwoTower(uv, iv, cfg.embed_dim, tuple(cfg.hidden), cfg.out_dim)


def make_two_tower_loss(model: TwoTower, cfg: TwoTowerConfig) -> Callable:
    """``loss(params, tables, users [B], items [B], key) -> scalar`` with uniform negative items."""

    def loss(params, tables: Tables, users, items, key):
        n_items = tables.item_cat.shape[0]
        neg = jax.random.randint(key, (users.shape[0], cfg.num_negatives), 0, n_items)
        ud = None if tables.user_dense is None else tables.user_dense[users]
        u = model.apply(params, tables.user_cat[users], ud, method=TwoTower.user)
        pd_ = None if tables.item_dense is None else tables.item_dense[items]
        nd = None if tables.item_dense is None else tables.item_dense[neg]
        ip = model.apply(params, tables.item_cat[items], pd_, method=TwoTower.item)
        ineg = model.apply(params, tables.item_cat[neg], nd, method=TwoTower.item)
        pos = jnp.sum(u * ip, -1)
        negs = jnp.einsum("bd,bkd->bk", u, ineg)
        if cfg.loss == "bpr":
            return bpr_loss(pos, jnp.where(neg == items[:, None], pos[:, None] - 30.0, negs))
        return sampled_softmax(pos, negs, neg == items[:, None])

    return loss


def init_two_tower(key, model: TwoTower, tables: Tables):
    ud = None if tables.user_dense is None else tables.user_dense[:1]
    idn = None if tables.item_dense is None else tables.item_dense[:1]
    return model.init(key, tables.user_cat[:1], tables.item_cat[:1], ud, idn)


def embed_all(model: TwoTower, params, tables: Tables) -> tuple[Array, Array]:
    """All user vectors ``[U, d]`` and item vectors ``[I, d]``."""
    t = jax.tree_util.tree_map(jnp.asarray, tables)
    u = model.apply(params, t.user_cat, t.user_dense, method=TwoTower.user)
    i = model.apply(params, t.item_cat, t.item_dense, method=TwoTower.item)
    return u, i


def retrieve(
    user_vecs: Array, item_vecs: Array, k: int, exclude: Array | None = None
) -> tuple[Array, Array]:
    """Top-``k`` items per user by dot product; ``exclude [U, I]`` (bool) removes items (e.g. seen).
    Returns ``(indices [U, k], scores [U, k])``."""
    scores = user_vecs @ item_vecs.T
    if exclude is not None:
        scores = jnp.where(exclude, -jnp.inf, scores)
    s, idx = jax.lax.top_k(scores, k)
    return idx, s
