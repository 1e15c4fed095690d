"""MeLU-style rating model (Lee et al., KDD 2019) with the improvements we measure.

Architecture: one embedding (``embed_dim``) per categorical user field and item field, multi-hot
genres through a bias-free Dense divided by the number of genres of the item (0 genres -> zero
vector), concatenation -> ReLU MLP (``hidden``) -> linear output. Options:

* ``residual`` (default True): prediction = ``x["offset"] + f(user, item)`` — the network predicts
  the residual over the user's (shrunk) support-mean rating.
* ``use_item_id`` (default True): embed the item-id field (``x["item"][:, 1]``); index 0 is the OOV
  row, a learned fallback used for items never seen in training.
* ``context_dim`` (default 0 = off): a CAVIA-style (Zintgraf et al., 2019) task-context vector
  ``context`` (a parameter initialised to 0) concatenated to every example's features and projected
  onto the item representation (item embeddings + genre vector), i.e. an adaptable user vector with
  an MF-like bilinear term ``(P c) . item``. The ``"context"`` filters adapt only it (plus the
  decision layers with ``"decision+context"``): few adapted parameters, per-user factors like MF
  fold-in.
* ``residual_bound`` (default 0 = off): the network's output ``f`` becomes ``b * tanh(f / b)``, so a
  prediction never leaves ``offset ± b`` (first-order meta-learners otherwise drift to
  initialisations whose inner loop diverges for a few users; see BUILD_NOTES.md).
* ``feature_dropout``: during meta-training (``train=True`` and a PRNG ``key``) each categorical
  field index is replaced by the OOV index 0 with this probability, so the OOV rows get trained. A
  float applies to every field; a tuple gives one probability per field (user fields, then item
  fields).

Inputs for one task (leaves share the example axis N; extra leading axes are fine)::

    x = {"user": int32 [N, n_user_fields], "item": int32 [N, n_item_fields],
         "genres": float32 [N, G], "offset": float32 [N]}

Any index outside ``[0, vocab)`` is mapped to the OOV index 0 (never an out-of-bounds gather).

Parameters are a plain dict pytree (the Flax ``"params"`` collection) with top-level names
``user_emb_{j}``, ``item_emb_{j}``, ``genre_proj`` (embeddings), ``mlp_{i}`` (hidden layers) and
``out`` (output layer); :func:`adapt_filter` builds inner-loop masks from these paths.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from metarec.meta.inner import path_filter
from metarec.meta.tables import LookupTable

PyTree = Any


class MeLU(nn.Module):
    """The Flax module (see the module docstring). Vocab sizes include the OOV index 0."""

    user_vocab: tuple[int, ...]
    item_vocab: tuple[int, ...]
    n_genres: int
    embed_dim: int = 32
    hidden: tuple[int, ...] = (64, 64)
    residual: bool = True
    use_item_id: bool = True
    feature_dropout: float | tuple[float, ...] = 0.0
    context_dim: int = 0
    residual_bound: float = 0.0

    def _dropout_probs(self) -> tuple[float, ...]:
        n = len(self.user_vocab) + len(self.item_vocab)
        p = self.feature_dropout
        probs = (float(p),) * n if isinstance(p, (int, float)) else tuple(float(q) for q in p)
        if len(probs) != n:
            raise ValueError(
                f"feature_dropout must be a float or a tuple of {n} probabilities "
                f"({len(self.user_vocab)} user + {len(self.item_vocab)} item fields), got {p!r}"
            )
        if any(not 0.0 <= q < 1.0 for q in probs):
            raise ValueError(f"feature_dropout probabilities must be in [0, 1), got {p!r}")
        return probs

    @nn.compact
    def __call__(self, x: dict, key: jax.Array | None = None, train: bool = False) -> jax.Array:
        user, item = x["user"], x["item"]
        if user.shape[-1] != len(self.user_vocab) or item.shape[-1] != len(self.item_vocab):
            raise ValueError(
                f"x['user'] has {user.shape[-1]} fields and x['item'] {item.shape[-1]}; the spec "
                f"declares {len(self.user_vocab)} user and {len(self.item_vocab)} item fields"
            )
        ids = jnp.concatenate([user, item], axis=-1).astype(jnp.int32)
        vocab = jnp.asarray(tuple(self.user_vocab) + tuple(self.item_vocab), jnp.int32)
        ids = jnp.where((ids >= 0) & (ids < vocab), ids, 0)  # unseen / invalid -> OOV row 0
        probs = self._dropout_probs()
        if train and key is not None and any(q > 0 for q in probs):
            drop = jax.random.bernoulli(key, jnp.asarray(probs, jnp.float32), ids.shape)
            ids = jnp.where(drop, 0, ids)

        n_user = len(self.user_vocab)
        feats = []
        for j, v in enumerate(self.user_vocab):
            feats.append(nn.Embed(v, self.embed_dim, name=f"user_emb_{j}")(ids[..., j]))
        item_feats = []
        for j, v in enumerate(self.item_vocab):
            if j == 1 and not self.use_item_id:
                continue
            item_feats.append(
                nn.Embed(v, self.embed_dim, name=f"item_emb_{j}")(ids[..., n_user + j])
            )
        genres = x["genres"].astype(jnp.float32)
        count = jnp.sum(genres, axis=-1, keepdims=True)
        g = nn.Dense(self.embed_dim, use_bias=False, name="genre_proj")(genres)
        item_feats.append(g / jnp.maximum(count, 1.0))
        feats += item_feats
        bilinear = 0.0
        if self.context_dim:
            c = self.param("context", nn.initializers.zeros, (self.context_dim,))
            feats.append(
                jnp.broadcast_to(c, feats[0].shape[:-1] + (self.context_dim,)).astype(
                    feats[0].dtype
                )
            )
            u = nn.Dense(self.embed_dim, use_bias=False, name="context_proj")(c)
            bilinear = jnp.sum(sum(item_feats) * u, axis=-1)
        h = jnp.concatenate(feats, axis=-1)
        for i, width in enumerate(self.hidden):
            h = nn.relu(nn.Dense(width, name=f"mlp_{i}")(h))
        out = nn.Dense(1, name="out")(h)[..., 0] + bilinear
        if self.residual_bound:
            # soft bound b*tanh(f/b): predictions stay within offset ± b whatever the parameters, so
            # an inner loop started from a poor initialisation cannot run off to inf
            out = self.residual_bound * jnp.tanh(out / self.residual_bound)
        if self.residual:
            out = out + x["offset"].astype(out.dtype)
        return out


def _spec_fields(spec) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    try:
        uv, iv, ng = (
            tuple(int(v) for v in spec.user_vocab),
            tuple(int(v) for v in spec.item_vocab),
            int(spec.n_genres),
        )
    except AttributeError as e:
        raise TypeError(
            "spec must have user_vocab (tuple of ints), item_vocab (tuple of ints) and "
            f"n_genres (int), e.g. metarec.data.encode.FeatureSpec; got {spec!r}"
        ) from e
    if any(v < 1 for v in uv + iv):
        raise ValueError(f"vocab sizes must be >= 1 (index 0 = OOV), got user {uv}, item {iv}")
    if ng < 0:
        raise ValueError(f"n_genres must be >= 0, got {ng}")
    return uv, iv, ng


def dummy_inputs(spec, n: int = 1) -> dict:
    """All-OOV inputs with ``n`` examples, used to initialise the model."""
    uv, iv, ng = _spec_fields(spec)
    return {
        "user": jnp.zeros((n, len(uv)), jnp.int32),
        "item": jnp.zeros((n, len(iv)), jnp.int32),
        "genres": jnp.zeros((n, ng), jnp.float32),
        "offset": jnp.zeros((n,), jnp.float32),
    }


def make_melu(
    spec,
    *,
    embed_dim: int = 32,
    hidden: Sequence[int] = (64, 64),
    residual: bool = True,
    use_item_id: bool = True,
    feature_dropout: float | Sequence[float] = 0.0,
    context_dim: int = 0,
    residual_bound: float = 0.0,
) -> tuple[Callable, Callable]:
    """Build ``(init_fn, apply_fn)`` for a MeLU model over ``spec`` (any object with ``user_vocab``,
    ``item_vocab``, ``n_genres``; see :class:`metarec.data.encode.FeatureSpec`).

    * ``init_fn(key) -> params`` (plain dict pytree),
    * ``apply_fn(params, x, *, key=None, train=False) -> preds`` ``[N]`` for one task's ``x``
      (leaves ``[N, ...]``); pure, jittable and vmappable. Feature dropout is applied only when
      ``train=True`` *and* a ``key`` is given.
    """
    uv, iv, ng = _spec_fields(spec)
    if use_item_id and len(iv) < 2:
        raise ValueError("use_item_id=True needs an item-id field (item_vocab of length 2)")
    module = MeLU(
        user_vocab=uv,
        item_vocab=iv,
        n_genres=ng,
        embed_dim=int(embed_dim),
        hidden=tuple(int(h) for h in hidden),
        residual=bool(residual),
        use_item_id=bool(use_item_id),
        feature_dropout=feature_dropout
        if isinstance(feature_dropout, (int, float))
        else tuple(feature_dropout),
        context_dim=int(context_dim),
        residual_bound=float(residual_bound),
    )
    module._dropout_probs()  # validate early, with a clear message

    def init_fn(key: jax.Array) -> PyTree:
        return module.init(key, dummy_inputs(spec))["params"]

    def apply_fn(
        params: PyTree, x: dict, *, key: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        return _sized(module, params).apply({"params": params}, x, key=key, train=train)

    return init_fn, apply_fn


def _sized(module: MeLU, params: PyTree) -> MeLU:
    """``module`` with each field's vocab read from its embedding table in ``params``: the module
    itself for full tables; a copy for the meta-step's row-gathered tables (``[1 + S + Q, dim]``,
    :mod:`metarec.meta.tables`), whose index columns hold positions in those rows."""

    def rows(name, v):
        table = params.get(name) if hasattr(params, "get") else None
        return v if table is None else int(jnp.shape(table["embedding"])[0])

    uv = tuple(rows(f"user_emb_{j}", v) for j, v in enumerate(module.user_vocab))
    iv = tuple(rows(f"item_emb_{j}", v) for j, v in enumerate(module.item_vocab))
    if uv == module.user_vocab and iv == module.item_vocab:
        return module
    return module.clone(user_vocab=uv, item_vocab=iv)


def lookup_tables(spec, *, use_item_id: bool = True, min_vocab: int = 0) -> tuple:
    """MeLU's embedding tables as :class:`metarec.meta.tables.LookupTable` for
    ``make_meta_step(..., sparse_tables=...)``: ``user_emb_{j}`` read by ``x["user"][..., j]`` and
    ``item_emb_{j}`` by ``x["item"][..., j]`` (no item-id table when ``use_item_id=False``).
    ``min_vocab`` keeps tables with fewer rows dense: gathering ``1 + S + Q`` rows per task only
    saves work on a table larger than that (the item ids; at ml-100k also the zip codes)."""
    uv, iv, _ = _spec_fields(spec)
    out = [LookupTable(f"user_emb_{j}/embedding", "user", j, v) for j, v in enumerate(uv)]
    out += [
        LookupTable(f"item_emb_{j}/embedding", "item", j, v)
        for j, v in enumerate(iv)
        if use_item_id or j != 1
    ]
    return tuple(t for t in out if t.vocab >= min_vocab)


_FILTERS = {
    "all": r".*",
    "decision": r"^(mlp_\d+|out)/",
    "head": r"^out/",
    "embeddings": r"^(user_emb_\d+|item_emb_\d+|genre_proj)/",
    "context": r"^context$",
    "decision+context": r"^(mlp_\d+/|out/|context$)",
}


def adapt_filter(name: str) -> Callable[[PyTree], PyTree]:
    """Named inner-loop parameter filter for MeLU params, built from parameter paths.

    Returns a callable ``params -> bool pytree`` (accepted as ``adapt_mask`` by every learner):

    * ``"decision"`` — MLP and output layers only (MeLU's local update),
    * ``"all"`` — every parameter,
    * ``"head"`` — the output layer only (ANIL),
    * ``"embeddings"`` — embeddings and the genre projection only,
    * ``"context"`` — the task-context vector only (CAVIA; needs ``context_dim > 0``),
    * ``"decision+context"`` — decision layers and the context vector.
    """
    if name not in _FILTERS:
        raise ValueError(f"unknown adapt filter {name!r}; allowed: {sorted(_FILTERS)}")
    regex = re.compile(_FILTERS[name])
    return path_filter(lambda s: regex.search(s) is not None)


def adapt_mask(params: PyTree, name: str) -> PyTree:
    """The bool pytree of :func:`adapt_filter` ``(name)`` applied to ``params``."""
    return adapt_filter(name)(params)
