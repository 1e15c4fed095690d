"""A rating model that contains collaborative filtering: a meta-learned, non-linear fold-in.

Prediction for user ``u`` and item ``i``::

    r^ = mu + b_u + b_i + p_u . q_i + f(user features, item content, p_u * q_i)

* Item side. ``q_i`` / ``b_i`` are item-id rows (``item_factors`` / ``item_bias``) meant to be
  filled from a matrix factorisation fitted on every training rating (:func:`with_item_tables`);
  the meta-learner then keeps refining them in its outer loop (unless ``freeze_tables``). An item
  whose id is out of vocabulary (new items, and ids dropped by ``id_dropout`` during
  meta-training) takes its vector and bias from its content instead: release-year embedding +
  genre projection -> ReLU layer -> ``content_factors`` / ``content_bias`` (zero-initialised).
  Dropping known ids during meta-training is what trains this content path on items whose ratings
  are known (the MetaEmb/MWUF idea, learned inside the meta-objective).
* User side. ``p_u = user_factors + sum_j E_j[user field j]`` and
  ``b_u = user_bias + sum_j e_j[user field j]``: ``user_factors`` and ``user_bias`` are the
  parameters the inner loop adapts (adapt mode ``"user"``); their initialisation and, with
  Meta-SGD, per-dimension step sizes are meta-learned; the feature embeddings (zero-initialised)
  make the starting point depend on the user's demographics, and the bias starts from the support
  mean's deviation from ``mu`` (``x["offset"]``, times a learned weight). A few inner gradient
  steps on the support set from this learned prior (with :func:`metarec.meta.inner.shrunk_mse`,
  a step that shrinks with few ratings, like ridge) is a learned generalisation of MF fold-in.
* Neighbourhood CF (``n_nbr > 0``): ``x["nbr"]`` holds per-example predictions computed from the
  task's support set (:mod:`metarec.baselines.neighbours`: user-kNN and item-kNN, leave-one-out
  on support examples); the output is ``(1 - sum_f w_f) r^ + sum_f w_f nbr_f`` with meta-learned
  weights ``nbr_weight`` (the neighbour predictions also feed ``f``), so the model contains both
  model-based and neighbourhood CF and learns their blend; the inner loop fits the user vector
  under the blend. Items with an out-of-vocabulary id are not blended: nobody's ratings of them
  were fitted, so their neighbour "predictions" are only the user's support mean (which
  ``x["offset"]`` already gives the model), and an id dropped by ``id_dropout`` is treated the
  same way, so meta-training simulates new items as they are met (the content path alone);
  ``nbr_new_items=True`` blends every item instead. ``nbr_new_own=True`` gives those items
  (new ones and dropped ids) a blend of their own: separate meta-learned weights
  ``nbr_weight_new`` over ``x["nbr_new"]``, the features each example would have if its item
  were new (:func:`metarec.baselines.neighbours.new_item_features`: the support mean and
  ``mu + b_u``), so meta-training meets a dropped id with what a real new item gets.
* ``new_item_mean`` (``lam`` in [0, 1]): the prediction for an item with an out-of-vocabulary id
  is ``(1 - lam) r^ + lam x["offset"]``, shrunk toward the user's support mean by a fixed weight
  (0 = off). For a new item the model has only its content; the support mean is what the user
  mean baseline predicts.
* ``f`` (``hidden`` non-empty): a ReLU MLP with a zero-initialised output layer, so it starts as
  no correction (``"user+head"`` also adapts its output layer).
* ``melu`` (a dict of :class:`metarec.models.melu.MeLU` settings): the prediction is a MeLU
  network (demographics, item id and content through an MLP, residual on ``x["offset"]``) plus
  the CF term ``b_u + b_i + p_u . q_i``; ``"user+decision"`` adapts the user representation and
  the network's decision layers (MeLU's local update).

Inputs are those of :mod:`metarec.models.melu` (``x["user"]``, ``x["item"]`` = [year, item id],
``x["genres"]``, ``x["offset"]``). Indices outside the vocabulary map to OOV row 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metarec.meta.inner import path_filter
from metarec.models.melu import MeLU, _spec_fields, dummy_inputs

PyTree = Any
_zeros = nn.initializers.zeros


class HybridCF(nn.Module):
    """The Flax module (see the module docstring). Vocab sizes include the OOV index 0."""

    user_vocab: tuple[int, ...]
    item_vocab: tuple[int, ...]
    n_genres: int
    dim: int = 16
    embed_dim: int = 16
    hidden: tuple[int, ...] = ()
    id_dropout: float = 0.2
    freeze_tables: bool = False
    melu: dict | None = None  # MeLU settings: a MeLU network as the non-linear part (see below)
    user_fields: int = -1  # the user prior uses the first user_fields user fields; -1 = all
    n_nbr: int = 0  # > 0: x["nbr"] [..., n_nbr] neighbourhood predictions, a learned blend
    nbr_init: float = 1 / 3  # the blend weights' initial value
    nbr_new_items: bool = False  # True: out-of-vocabulary ids are blended too
    nbr_new_own: bool = False  # True: ... by their own weights over x["nbr_new"]
    new_item_mean: float = 0.0  # > 0: out-of-vocabulary ids shrink toward the support mean
    # > 0: item factors start N(0, table_init^2) instead of zero, for tables learned in the outer
    # loop rather than filled from an MF (zero user and item vectors would be a saddle of p . q)
    table_init: float = 0.0

    @nn.compact
    def __call__(self, x: dict, key: jax.Array | None = None, train: bool = False) -> jax.Array:
        user, item = x["user"].astype(jnp.int32), x["item"].astype(jnp.int32)
        uv = jnp.asarray(self.user_vocab, jnp.int32)
        iv = jnp.asarray(self.item_vocab, jnp.int32)
        user = jnp.where((user >= 0) & (user < uv), user, 0)
        item = jnp.where((item >= 0) & (item < iv), item, 0)
        year, item_id = item[..., 0], item[..., 1]
        if train and key is not None and self.id_dropout > 0:
            item_id = jnp.where(
                jax.random.bernoulli(key, self.id_dropout, item_id.shape), 0, item_id
            )
        known = (item_id > 0)[..., None]

        # item side: MF rows for known ids, the content path otherwise
        q_init = nn.initializers.normal(self.table_init) if self.table_init > 0 else _zeros
        q_id = nn.Embed(self.item_vocab[1], self.dim, embedding_init=q_init, name="item_factors")(
            item_id
        )
        b_id = nn.Embed(self.item_vocab[1], 1, embedding_init=_zeros, name="item_bias")(item_id)
        genres = x["genres"].astype(jnp.float32)
        g = nn.Dense(self.embed_dim, use_bias=False, name="genre_proj")(genres)
        content = nn.Embed(self.item_vocab[0], self.embed_dim, name="year_emb")(year)
        content = content + g / jnp.maximum(jnp.sum(genres, -1, keepdims=True), 1.0)
        h_c = nn.relu(nn.Dense(self.embed_dim, name="content_mlp")(content))
        q_c = nn.Dense(self.dim, kernel_init=_zeros, name="content_factors")(h_c)
        b_c = nn.Dense(1, kernel_init=_zeros, name="content_bias")(h_c)
        if self.freeze_tables:  # the MF item side as given: the outer loop does not move it
            q_id, b_id = jax.lax.stop_gradient(q_id), jax.lax.stop_gradient(b_id)
        q = jnp.where(known, q_id, q_c)
        b_i = jnp.where(known, b_id, b_c)[..., 0]

        # user side: the adapted vector and bias on top of a demographic prior
        p = self.param("user_factors", _zeros, (self.dim,))
        b_u = self.param("user_bias", _zeros, ())
        n_fields = len(self.user_vocab) if self.user_fields < 0 else self.user_fields
        for j, v in enumerate(self.user_vocab[:n_fields]):
            p = p + nn.Embed(v, self.dim, embedding_init=_zeros, name=f"user_prior_{j}")(
                user[..., j]
            )
            b_u = (
                b_u
                + nn.Embed(v, 1, embedding_init=_zeros, name=f"user_bias_prior_{j}")(user[..., j])[
                    ..., 0
                ]
            )
        mu = self.param("global_bias", _zeros, ())
        nbr = x["nbr"].astype(jnp.float32) if self.n_nbr else None
        own = bool(self.n_nbr) and self.nbr_new_own
        if own:  # an out-of-vocabulary id reads the features a new item has
            nbr = jnp.where(known, nbr, x["nbr_new"].astype(jnp.float32))

        def blend(out):  # the neighbourhood blend, then new items toward the support mean
            if self.n_nbr:  # (1 - sum w) x the model + sum_f w_f x neighbour prediction f
                init = nn.initializers.constant(self.nbr_init)
                w = self.param("nbr_weight", init, (self.n_nbr,))
                if own:  # per example: the known items' weights or the new items'
                    w = jnp.where(known, w, self.param("nbr_weight_new", init, (self.n_nbr,)))
                    mix = jnp.sum((nbr - out[..., None]) * w, axis=-1)
                else:
                    mix = (nbr - out[..., None]) @ w
                blend_all = self.nbr_new_items or own
                out = out + (mix if blend_all else jnp.where(known[..., 0], mix, 0.0))
            if self.new_item_mean > 0:  # new items: toward the user's support mean
                lam, mean = self.new_item_mean, x["offset"].astype(jnp.float32)
                out = jnp.where(known[..., 0], out, (1.0 - lam) * out + lam * mean)
            return out

        if self.melu is not None:
            # a MeLU network (its own residual on x["offset"]) plus the CF term on top
            net = MeLU(self.user_vocab, self.item_vocab, self.n_genres, name="melu", **self.melu)
            k_net = None if key is None else jax.random.fold_in(key, 1)
            cf = b_u + b_i + jnp.sum(p * q, axis=-1)
            return blend(net(x, key=k_net, train=train) + cf)
        # the support mean's deviation from mu (x["offset"], from the support set only) as a
        # learned-weight start for the user bias
        w_off = self.param("offset_weight", nn.initializers.ones, ())
        b_u = b_u + w_off * (x["offset"].astype(jnp.float32) - mu)
        out = mu + b_u + b_i + jnp.sum(p * q, axis=-1)
        parts = [content, p * q, q, jnp.broadcast_to(p, q.shape)] + ([nbr] if self.n_nbr else [])
        if self.hidden:
            h = jnp.concatenate(parts, axis=-1)
            for i, width in enumerate(self.hidden):
                h = nn.relu(nn.Dense(width, name=f"mlp_{i}")(h))
            out = out + nn.Dense(1, kernel_init=_zeros, name="out")(h)[..., 0]
        return blend(out)


def make_hybrid(
    spec,
    *,
    dim: int = 16,
    embed_dim: int = 16,
    hidden: Sequence[int] = (),
    id_dropout: float = 0.2,
    freeze_tables: bool = False,
    melu: dict | None = None,
    n_nbr: int = 0,
    nbr_init: float = 1 / 3,
    user_fields: int = -1,
    nbr_new_items: bool = False,
    nbr_new_own: bool = False,
    table_init: float = 0.0,
    new_item_mean: float = 0.0,
) -> tuple[Callable, Callable]:
    """``(init_fn, apply_fn)`` of :class:`HybridCF` over ``spec`` (a
    :class:`~metarec.data.encode.FeatureSpec`); the same calling convention as
    :func:`metarec.models.melu.make_melu` (``apply_fn(params, x, *, key=None, train=False)``;
    item-id dropout only with ``train=True`` and a key)."""
    uv, iv, ng = _spec_fields(spec)
    if len(iv) != 2:
        raise ValueError(f"the hybrid model needs item fields (year, item id), got vocab {iv}")
    if not 0.0 <= float(id_dropout) < 1.0:
        raise ValueError(f"id_dropout must be in [0, 1), got {id_dropout}")
    if not 0.0 <= float(new_item_mean) <= 1.0:
        raise ValueError(f"new_item_mean must be in [0, 1], got {new_item_mean}")
    module = HybridCF(
        user_vocab=uv,
        item_vocab=iv,
        n_genres=ng,
        dim=int(dim),
        embed_dim=int(embed_dim),
        hidden=tuple(int(h) for h in hidden),
        id_dropout=float(id_dropout),
        freeze_tables=bool(freeze_tables),
        melu=None if melu is None else dict(melu),
        n_nbr=int(n_nbr),
        user_fields=int(user_fields),
        nbr_init=float(nbr_init),
        nbr_new_items=bool(nbr_new_items),
        nbr_new_own=bool(nbr_new_own),
        table_init=float(table_init),
        new_item_mean=float(new_item_mean),
    )

    def init_fn(key: jax.Array) -> PyTree:
        x = dummy_inputs(spec)
        if n_nbr:
            f = jnp.zeros(x["offset"].shape + (int(n_nbr),), jnp.float32)
            x = x | {"nbr": f} | ({"nbr_new": f} if nbr_new_own else {})
        return module.init(key, x)["params"]

    def apply_fn(params, x, *, key=None, train=False):
        return module.apply({"params": params}, x, key=key, train=train)

    return init_fn, apply_fn


def with_item_tables(params: PyTree, rows, item_bias, item_factors, mu) -> PyTree:
    """``params`` with item-id rows ``rows`` (encoder indices, ``[n]``) set to a fitted MF's
    ``item_bias [n]`` / ``item_factors [n, d]`` (each dimension scaled to unit root-mean-square)
    and ``global_bias`` set to its ``mu``; every other row (OOV and items without ratings) stays
    zero. ``d`` must equal the model's ``dim``."""
    rows = np.asarray(rows)
    fac = params["item_factors"]["embedding"]
    if np.shape(item_factors) != (len(rows), fac.shape[1]):
        raise ValueError(
            f"item_factors has shape {np.shape(item_factors)}; expected ({len(rows)}, "
            f"{fac.shape[1]}) for {len(rows)} rows and the model's dim"
        )
    if len(rows) and (rows.min() < 1 or rows.max() >= fac.shape[0]):
        raise ValueError("item rows must be in-vocabulary indices (1 .. vocab-1)")
    # unit RMS per dimension: the user vector's curvature then matches its bias's, so one inner
    # step size suits both (p . q is unchanged up to a per-dimension rescaling of p, which is
    # learned from zero anyway)
    q = np.asarray(item_factors, np.float64)
    rms = np.sqrt(np.mean(q**2, axis=0)) if len(q) else np.ones(fac.shape[1])
    q = q / np.where(rms > 0, rms, 1.0)
    out = jax.tree_util.tree_map(lambda a: a, params)
    out["item_factors"] = {"embedding": fac.at[rows].set(jnp.asarray(q, fac.dtype))}
    bias = params["item_bias"]["embedding"]
    out["item_bias"] = {"embedding": bias.at[rows, 0].set(jnp.asarray(item_bias, bias.dtype))}
    out["global_bias"] = jnp.asarray(mu, params["global_bias"].dtype)
    return out


_FILTERS = {
    "user": r"^(user_factors|user_bias)$",
    "user+decision": r"^(user_factors$|user_bias$|melu/(mlp_\d+|out)/)",
    "user+head": r"^(user_factors$|user_bias$|out/)",
    "all": r".*",
}
ADAPT_MODES = tuple(_FILTERS)


def adapt_filter(name: str) -> Callable[[PyTree], PyTree]:
    """Inner-loop parameter filter: ``"user"`` (the user vector and bias: fold-in), ``"user+head"``
    (also the residual MLP's output layer), ``"user+decision"`` (also the MeLU network's decision
    layers), ``"all"``."""
    if name not in _FILTERS:
        raise ValueError(f"unknown adapt filter {name!r}; allowed: {sorted(_FILTERS)}")
    regex = re.compile(_FILTERS[name])
    return path_filter(lambda s: regex.search(s) is not None)
