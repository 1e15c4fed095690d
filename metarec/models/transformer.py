"""Transformer encoder over a user's interaction history, and a rating model built on it.

Token conventions (shared by masked-item pretraining (:mod:`metarec.training.pretrain`), the rater
below and the encoder checkpoints):

* item tokens are the integer item *indices* of the feature encoder's item vocabulary
  (``x["item"][:, 1]`` of :mod:`metarec.data.encode`): ``1 .. num_items - 1`` are known items, index
  ``0`` is the out-of-vocabulary item (a new item).  Padding is **not** expressed by an item id but
  by a separate ``mask`` (1.0 real, 0.0 padding), so an OOV item inside a history is still a real
  token.  Index ``num_items`` is the ``[MASK]`` token of masked-item pretraining, so the embedding
  table has ``num_items + 1`` rows.
* ratings are floats; they are rounded to ``1 .. rating_levels`` and embedded; ``0`` means
  "unknown" (used for masked positions and for histories without explicit feedback).
* sequences are right-padded: real tokens first, padding after.  Positions are learned absolute
  position embeddings ``0 .. max_len - 1``.

Padding never influences a real position: attention logits towards padded keys are replaced by a
large negative number before the softmax (their weight is exactly 0 in float32) and padded outputs
are zeroed.  With ``causal=True`` position ``i`` attends only to positions ``<= i``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metarec.data.tasks import Examples, Task

Array = jax.Array
NEG = -1e9  # score of tokens that must never be ranked (finite, so softmaxes stay NaN-free)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of :class:`HistoryEncoder` (also stored in pretraining checkpoints).

    Attributes:
      num_items: size of the item-index vocabulary including index 0 (OOV); the ``[MASK]`` token is
        ``num_items``.
      max_len: longest history (number of learned positions).
      width: model width ``D``.
      depth: number of pre-LayerNorm Transformer blocks.
      heads: attention heads (must divide ``width``).
      mlp_ratio: hidden size of the feed-forward block is ``mlp_ratio * width``.
      dropout_rate: dropout on attention weights and residual branches (training only).
      causal: if True, position ``i`` attends only to positions ``<= i``.
      rating_levels: ratings are rounded and clipped to ``1 .. rating_levels`` (0 = unknown).
    """

    num_items: int
    max_len: int = 100
    width: int = 64
    depth: int = 2
    heads: int = 2
    mlp_ratio: int = 4
    dropout_rate: float = 0.1
    causal: bool = False
    rating_levels: int = 5

    def __post_init__(self):
        if self.num_items < 2:
            raise ValueError(
                f"EncoderConfig.num_items must be >= 2 (OOV + one item), got {self.num_items}"
            )
        if self.max_len < 1:
            raise ValueError(f"EncoderConfig.max_len must be >= 1, got {self.max_len}")
        if self.width % self.heads:
            raise ValueError(
                f"EncoderConfig.width={self.width} must be divisible by heads={self.heads}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(
                f"EncoderConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}"
            )

    @property
    def mask_token(self) -> int:
        """Item id of the ``[MASK]`` token."""
        return self.num_items

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown EncoderConfig fields {sorted(unknown)}; allowed {sorted(known)}"
            )
        return cls(**d)


def rating_tokens(ratings: Array, rating_levels: int) -> Array:
    """Round float ratings to integer tokens ``0 .. rating_levels`` (0 = unknown / not given)."""
    return jnp.clip(jnp.round(ratings), 0, rating_levels).astype(jnp.int32)


def attention_mask(mask: Array, causal: bool) -> Array:
    """Boolean attention mask ``[..., 1, L, L]`` (query, key) from a ``[..., L]`` padding mask.

    Every query may attend to every real key (and, with ``causal``, only keys at or before it).
    """
    keys = mask > 0
    L = mask.shape[-1]
    allowed = jnp.broadcast_to(keys[..., None, :], mask.shape + (L,))
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((L, L), bool))
    return allowed[..., None, :, :]


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    width: int
    heads: int
    mlp_ratio: int
    dropout_rate: float

    @nn.compact
    def __call__(self, x: Array, attn_mask: Array, deterministic: bool) -> Array:
        h = nn.LayerNorm(name="ln_attn")(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.heads,
            qkv_features=self.width,
            dropout_rate=self.dropout_rate,
            name="attn",
        )(h, h, mask=attn_mask, deterministic=deterministic)
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        x = x + h
        h = nn.LayerNorm(name="ln_mlp")(x)
        h = nn.Dense(self.mlp_ratio * self.width, name="mlp_in")(h)
        h = nn.gelu(h)
        h = nn.Dense(self.width, name="mlp_out")(h)
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return x + h


class HistoryEncoder(nn.Module):
    """Transformer over a time-ordered (right-padded) interaction history.

    ``__call__(items [..., L] int, ratings [..., L] float, mask [..., L]) -> hidden [..., L, D]``
    (padded positions are zero).  ``logits(hidden)`` gives item-prediction logits over the whole
    vocabulary (output layer tied to the item embedding, plus a per-item bias);
    ``candidate_logits(hidden, ids)`` the same for a subset of items (sampled softmax).
    """

    config: EncoderConfig

    def setup(self):
        c = self.config
        init = nn.initializers.normal(stddev=0.02)
        self.item_embed = nn.Embed(c.num_items + 1, c.width, embedding_init=init, name="item_embed")
        self.rating_embed = nn.Embed(
            c.rating_levels + 1, c.width, embedding_init=init, name="rating_embed"
        )
        self.pos_embed = self.param("pos_embed", init, (c.max_len, c.width))
        self.blocks = [
            Block(c.width, c.heads, c.mlp_ratio, c.dropout_rate, name=f"block_{i}")
            for i in range(c.depth)
        ]
        self.final_ln = nn.LayerNorm(name="final_ln")
        self.drop = nn.Dropout(c.dropout_rate)
        self.out_bias = self.param("out_bias", nn.initializers.zeros, (c.num_items + 1,))

    def __call__(
        self, items: Array, ratings: Array, mask: Array, deterministic: bool = True
    ) -> Array:
        c = self.config
        L = items.shape[-1]
        if L > c.max_len:
            raise ValueError(f"history length {L} exceeds the encoder's max_len={c.max_len}")
        mask = mask.astype(jnp.float32)
        x = self.item_embed(items) + self.rating_embed(rating_tokens(ratings, c.rating_levels))
        x = x + self.pos_embed[:L]
        x = self.drop(x, deterministic=deterministic)
        am = attention_mask(mask, c.causal)
        for blk in self.blocks:
            x = blk(x, am, deterministic)
        x = self.final_ln(x)
        return x * mask[..., None]

    def embed_items(self, ids: Array) -> Array:
        """Input embeddings of item ids ``[...] -> [..., D]`` (shared with the output layer)."""
        return self.item_embed(ids)

    def logits(self, hidden: Array) -> Array:
        """Logits over all ``num_items + 1`` tokens ``[..., V+1]``; callers exclude the OOV index 0
        and the ``[MASK]`` token (see :func:`valid_item_mask`)."""
        return self.item_embed.attend(hidden) + self.out_bias

    def candidate_logits(self, hidden: Array, ids: Array) -> Array:
        """Logits ``[..., K]`` of candidate items ``ids`` (``[K]`` or ``[..., K]``)."""
        emb = self.item_embed(ids)
        if ids.ndim == 1:
            return hidden @ emb.T + self.out_bias[ids]
        return jnp.einsum("...d,...kd->...k", hidden, emb) + self.out_bias[ids]


def valid_item_mask(num_items: int) -> Array:
    """``[num_items + 1]`` bool: True for real items ``1 .. num_items - 1`` (not OOV nor [MASK])."""
    ids = jnp.arange(num_items + 1)
    return (ids > 0) & (ids < num_items)


def init_encoder(key: Array, config: EncoderConfig):
    """Random encoder parameters ``{"params": ...}``."""
    L = config.max_len
    z = jnp.zeros((1, L), jnp.int32)
    return HistoryEncoder(config).init(key, z, jnp.zeros((1, L)), jnp.ones((1, L)))


def append_mask_token(items: Array, ratings: Array, mask: Array, mask_token: int):
    """Append ``[MASK]`` after the last real position (shifting a full sequence left by one).

    Returns ``(items, ratings, mask, pos)`` where ``pos [B]`` is the position of the ``[MASK]``.
    """
    L = items.shape[-1]
    n = mask.sum(-1).astype(jnp.int32)
    full = (n >= L)[..., None]

    def roll(a):
        return jnp.where(full, jnp.roll(a, -1, axis=-1), a)

    items, ratings, mask = roll(items), roll(ratings), roll(mask)
    pos = jnp.minimum(n, L - 1)
    at = jax.nn.one_hot(pos, L, dtype=bool)
    return (
        jnp.where(at, mask_token, items).astype(jnp.int32),
        jnp.where(at, 0.0, ratings),
        jnp.where(at, 1.0, mask),
        pos,
    )


def next_item_logits(
    params, config: EncoderConfig, items: Array, ratings: Array, mask: Array
) -> Array:
    """Scores ``[B, num_items + 1]`` of the item following each history (``[MASK]`` appended);
    invalid tokens (OOV, ``[MASK]``) get :data:`NEG`."""
    model = HistoryEncoder(config)
    it, rt, mk, pos = append_mask_token(items, ratings, mask, config.mask_token)
    h = model.apply(params, it, rt, mk)
    h_last = jnp.take_along_axis(h, pos[:, None, None], axis=1)[:, 0]
    logits = model.apply(params, h_last, method=HistoryEncoder.logits)
    return jnp.where(valid_item_mask(config.num_items), logits, NEG)


def pool(hidden: Array, mask: Array, mode: str = "mean") -> Array:
    """Summarise ``hidden [..., L, D]`` into ``[..., D]``: the masked ``"mean"`` or the ``"last"``
    real position.

    An empty history (all padding) gives the zero vector.
    """
    mask = mask.astype(hidden.dtype)
    if mode == "mean":
        return (hidden * mask[..., None]).sum(-2) / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
    if mode == "last":
        last = jnp.maximum(mask.sum(-1).astype(jnp.int32) - 1, 0)
        out = jnp.take_along_axis(hidden, last[..., None, None], axis=-2)[..., 0, :]
        return out * (mask.sum(-1, keepdims=True) > 0)
    raise ValueError(f"pool mode must be 'mean' or 'last', got {mode!r}")


# ---------------------------------------------------------------------------------------------
# The rating model used by the meta-learners.
# ---------------------------------------------------------------------------------------------


def add_history(task: Task) -> Task:
    """Put each task's support set into the inputs of its support and query examples.

    Adds ``x["hist_item"] [.., N, H] int32`` (the support items' indices ``x["item"][..., 1]``),
    ``x["hist_rating"] [.., N, H] float32`` (the support ratings ``y``) and ``x["hist_mask"]
    [.., N, H] float32`` (the support mask) with ``H`` = support size, identical for every example
    of a task (support and query).  Works with or without a leading task axis, on numpy or jax
    leaves.  Support examples are compacted to the front (real first, padding after), which is the
    layout the encoder expects.  Models built by :func:`make_transformer_rater` rely on the rows
    being identical and encode the history once per task.
    """
    sup = task.support
    if not isinstance(sup.x, Mapping) or "item" not in sup.x:
        raise ValueError(
            "add_history needs task.support.x to be a dict with an 'item' [.., N, 2] entry"
        )
    xp = np if isinstance(sup.y, np.ndarray) else jnp
    items = sup.x["item"][..., 1].astype(xp.int32)
    ratings = sup.y.astype(xp.float32)
    mask = sup.mask.astype(xp.float32)
    # Right-align padding: stable sort real examples first.
    order = xp.argsort(-mask, axis=-1, stable=True)

    def take(a):
        return xp.take_along_axis(a, order, axis=-1)

    items, ratings, mask = take(items), take(ratings), take(mask)
    ratings = ratings * mask

    def attach(ex: Examples) -> Examples:
        n = ex.y.shape[-1]

        def tile(a):
            return xp.broadcast_to(a[..., None, :], a.shape[:-1] + (n, a.shape[-1]))

        x = dict(ex.x)
        x["hist_item"] = xp.asarray(tile(items))
        x["hist_rating"] = xp.asarray(tile(ratings))
        x["hist_mask"] = xp.asarray(tile(mask))
        if xp is np:  # materialise (broadcast_to gives read-only views)
            for k in ("hist_item", "hist_rating", "hist_mask"):
                x[k] = np.ascontiguousarray(x[k])
        return ex.replace(x=x)

    return task.replace(support=attach(task.support), query=attach(task.query))


class LoRADense(nn.Module):
    """Dense layer with an optional low-rank adapter: ``y = x W + b + (x A) B * alpha / r``.

    ``B`` starts at zero, so the adapter is initially the identity change; adapting only
    ``lora_a``/``lora_b`` per user touches ``r * (in + out)`` numbers.
    """

    features: int
    rank: int = 0
    alpha: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = nn.Dense(self.features, name="dense")(x)
        if self.rank > 0:
            init_a = nn.initializers.normal(stddev=1.0 / np.sqrt(x.shape[-1]))
            a = self.param("lora_a", init_a, (x.shape[-1], self.rank))
            b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
            y = y + (x @ a) @ b * (self.alpha / self.rank)
        return y


@dataclasses.dataclass(frozen=True)
class RaterConfig:
    """Configuration of :func:`make_transformer_rater`.

    Attributes:
      encoder: the history encoder (must match the pretrained encoder's config, if any).
      n_years: size of the release-year vocabulary (``x["item"][:, 0]``).
      n_genres: number of genres (``x["genres"]`` width).
      item_dim: width of the year/genre item features.
      head_hidden: hidden sizes of the rating head.
      lora_rank: rank of the LoRA adapters on the head layers (0 = none).
      pool: history summary, ``"mean"`` or ``"last"``.
      content_dim: width of ``x["content"]`` (precomputed item content embeddings, see
        :mod:`metarec.models.content`); 0 = not used.
      use_offset: add ``x["offset"]`` (the user's shrunk support mean) to the prediction.
    """

    encoder: EncoderConfig
    n_years: int
    n_genres: int
    item_dim: int = 32
    head_hidden: tuple[int, ...] = (64, 32)
    lora_rank: int = 0
    pool: str = "mean"
    content_dim: int = 0
    use_offset: bool = True


class TransformerRater(nn.Module):
    """Rating head on ``[history summary, item embedding, summary * item, item features]``.

    The history is encoded once per task from row 0 of ``x["hist_*"]`` (the rows are identical by
    construction of :func:`add_history`).
    """

    config: RaterConfig

    @nn.compact
    def __call__(self, x: Mapping[str, Array]) -> Array:
        c = self.config
        enc = HistoryEncoder(c.encoder, name="encoder")
        h = enc(x["hist_item"][0], x["hist_rating"][0], x["hist_mask"][0], deterministic=True)
        summary = pool(h, x["hist_mask"][0], c.pool)  # [D]
        item_idx = x["item"][..., 1]
        item_e = enc.embed_items(item_idx)  # [N, D]
        year = nn.Embed(c.n_years, c.item_dim, name="year_embed")(x["item"][..., 0])
        genres = x["genres"].astype(jnp.float32)
        genre = nn.Dense(c.item_dim, use_bias=False, name="genre_proj")(genres)
        feats = [jnp.broadcast_to(summary, item_e.shape), item_e, summary * item_e, year, genre]
        if c.content_dim:
            if "content" not in x:
                raise ValueError(
                    "RaterConfig.content_dim > 0 but x has no 'content' entry (see add_content)"
                )
            feats.append(nn.Dense(c.item_dim, name="content_proj")(x["content"]))
        z = jnp.concatenate(feats, -1)
        for i, width in enumerate(c.head_hidden):
            z = nn.relu(LoRADense(width, c.lora_rank, name=f"head_{i}")(z))
        out = LoRADense(1, c.lora_rank, name="head_out")(z)[..., 0]
        if c.use_offset and "offset" in x:
            out = out + x["offset"]
        return out


ADAPT_MODES = ("head", "lora", "all", "head+last_block")


def _path_names(path) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return out


def adapt_filter(mode: str, depth: int | None = None) -> Callable[[Any], Any]:
    """Mask builder ``params -> bool pytree`` selecting the rater parameters adapted per user.

    Same contract as :func:`metarec.meta.inner.path_filter` (pass it as the meta-learners'
    ``adapt_filter``/``mask``).  Modes: ``"head"`` (the rating head ``head_*``), ``"lora"`` (only
    the LoRA factors of the head; needs ``lora_rank > 0``), ``"head+last_block"`` (head and the last
    encoder block; needs ``depth``), ``"all"``.
    """
    if mode not in ADAPT_MODES:
        raise ValueError(f"adapt mode must be one of {ADAPT_MODES}, got {mode!r}")
    if mode == "head+last_block" and not depth:
        raise ValueError(
            "adapt mode 'head+last_block' needs depth (the encoder's number of blocks)"
        )

    def pred(names: list[str]) -> bool:
        is_head = any(n.startswith("head_") for n in names)
        if mode == "all":
            return True
        if mode == "head":
            return is_head
        if mode == "lora":
            return is_head and names[-1] in ("lora_a", "lora_b")
        return is_head or ("encoder" in names and f"block_{depth - 1}" in names)

    def build(params):
        mask = jax.tree_util.tree_map_with_path(lambda p, _: pred(_path_names(p)), params)
        if not any(jax.tree_util.tree_leaves(mask)):
            raise ValueError(
                f"adapt mode {mode!r} selects no parameter (lora needs RaterConfig.lora_rank > 0)"
            )
        return mask

    return build


def _encoder_params(pretrained: Mapping, config: EncoderConfig):
    """The ``params`` collection of a pretrained encoder, checked against ``config``."""
    src = pretrained["params"] if "params" in pretrained else pretrained
    want = jax.eval_shape(lambda: init_encoder(jax.random.PRNGKey(0), config))["params"]
    tree = jax.tree_util.tree_structure
    shapes = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), src)
    if tree(src) != tree(want) or shapes != jax.tree_util.tree_map(lambda a: a.shape, want):
        raise ValueError(
            "pretrained encoder parameters do not match the rater's encoder config "
            f"{config}; build the rater with the EncoderConfig the encoder was trained with"
        )
    return src


def make_transformer_rater(
    config: RaterConfig, pretrained: Mapping | None = None
) -> tuple[Callable[[Array], Any], Callable[[Any, Mapping[str, Array]], Array]]:
    """Rating model on a (pretrained) history encoder, shaped like the MeLU model.

    Returns ``(init_fn(key) -> params, apply_fn(params, x) -> preds [N])``; ``x`` is the per-example
    dict of one task extended by :func:`add_history`.  ``pretrained`` holds encoder parameters
    (``{"params": ...}`` as :func:`init_encoder` makes them, e.g. loaded with
    :func:`metarec.training.encoder_checkpoint.load_pretrained`): they replace the random encoder
    weights; their shapes must match ``config.encoder``.
    """
    model = TransformerRater(config)
    src = None if pretrained is None else _encoder_params(pretrained, config.encoder)

    def dummy_x():
        H = config.encoder.max_len
        x = {
            "hist_item": jnp.zeros((1, H), jnp.int32),
            "hist_rating": jnp.zeros((1, H), jnp.float32),
            "hist_mask": jnp.zeros((1, H), jnp.float32),
            "item": jnp.zeros((1, 2), jnp.int32),
            "genres": jnp.zeros((1, config.n_genres), jnp.float32),
            "offset": jnp.zeros((1,), jnp.float32),
        }
        if config.content_dim:
            x["content"] = jnp.zeros((1, config.content_dim), jnp.float32)
        return x

    def init_fn(key: Array):
        params = model.init(key, dummy_x())
        if src is not None:
            params = jax.tree_util.tree_map(lambda a: a, params)  # copy structure
            inner = dict(params["params"])
            inner["encoder"] = jax.tree_util.tree_map(jnp.asarray, src)
            params = {"params": inner}
        return params

    def apply_fn(params, x, key=None, train=False):
        # deterministic model: ``key``/``train`` are accepted (the meta-learners pass them when they
        # hold a PRNG key) and ignored.
        del key, train
        return model.apply(params, x)

    return init_fn, apply_fn
