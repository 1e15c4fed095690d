"""Masked-item pretraining (BERT4Rec-style) of :class:`metarec.models.transformer.HistoryEncoder`.

Pipeline: a ratings frame -> :func:`build_sequences` (time-ordered, right-padded item/rating
sequences per user) -> :func:`holdout_split` (a validation subset of users whose last item is held
out) -> :func:`pretrain` (whole epochs jitted as one ``lax.scan``) -> :func:`evaluate_next_item`
(full-catalogue HR@k / nDCG@k / top-1 accuracy of the held-out item) -> :func:`save_pretrained` /
:func:`load_pretrained` (orbax checkpoint + JSON config).

Objective: in every sequence each real position is replaced by ``[MASK]`` with probability
``mask_prob`` (at least one per non-empty sequence; with probability ``last_prob`` a sequence has
only its last real item masked, which matches next-item evaluation).  Masked positions also lose
their rating (token 0 = unknown).  The model predicts the masked item with a full softmax over the
catalogue (items ``1 .. num_items - 1``; OOV and ``[MASK]`` excluded) or, with
``num_negatives > 0``, a sampled softmax against uniformly drawn negatives (accidental hits masked).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metarec.models.transformer import EncoderConfig, HistoryEncoder, valid_item_mask

Array = jax.Array
NEG = -1e9


# ---------------------------------------------------------------------------------------------
# Sequences
# ---------------------------------------------------------------------------------------------


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

    def select(self, idx) -> "Sequences":
        return jax.tree_util.tree_map(lambda a: a[idx], self)


def _exclude_items(logits: jax.Array, items: jax.Array, mask: jax.Array) -> jax.Array:
    """``logits`` ``[B, V]`` with the items of each row's history (``items`` ``[B, L]`` where
    ``mask > 0``) set to ``NEG``, so they cannot be ranked."""
    seen = jnp.zeros_like(logits, bool).at[jnp.arange(items.shape[0])[:, None], items].max(mask > 0)
    return jnp.where(seen, NEG, logits)


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
        ``encoder.vocabs["item_id"].encode`` of a fitted :class:`metarec.data.encode.FeatureEncoder`,
        so that pretraining and the rater share one item indexing.
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
    U = len(uniq)
    items = np.zeros((U, max_len), np.int32)
    rat = np.zeros((U, max_len), np.float32)
    mask = np.zeros((U, max_len), np.float32)
    idx = df["idx"].to_numpy()
    r = df["rating"].to_numpy(np.float32)
    for u, (s, c) in enumerate(zip(start, counts)):
        keep = min(c, max_len)
        lo = s + c - keep
        items[u, :keep] = idx[lo : s + c]
        rat[u, :keep] = r[lo : s + c]
        mask[u, :keep] = 1.0
    return Sequences(items=items, ratings=rat, mask=mask, user=uniq.astype(np.int64))


def holdout_split(seqs: Sequences, val_fraction: float, seed: int, min_len: int = 3) -> tuple[Sequences, Sequences]:
    """Split off a validation subset of users whose **last** item is held out.

    ``val_fraction`` of the users with at least ``min_len`` items are drawn with
    ``numpy.random.default_rng(seed)``.  Returns ``(train, val)``: ``train`` holds every user (the
    validation users without their last item), ``val`` the validation users' full sequences; their
    last real position is the target of :func:`evaluate_next_item`.
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


# ---------------------------------------------------------------------------------------------
# Masking and the objective
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class MaskedBatch:
    """Inputs and targets of the masked-item objective (all ``[B, L]``)."""

    items: Array  # input items, [MASK] at masked positions
    ratings: Array  # input ratings, 0 at masked positions
    mask: Array  # padding mask (unchanged)
    labels: Array  # original item at masked positions, 0 elsewhere
    label_mask: Array  # 1.0 at masked positions


def mask_items(
    key: Array, items: Array, ratings: Array, mask: Array, mask_prob: float, mask_token: int, last_prob: float = 0.0
) -> MaskedBatch:
    """Choose masked positions for a batch of right-padded sequences ``[B, L]`` (pure, jittable).

    Each real position is masked independently with probability ``mask_prob``; a non-empty
    sequence with no masked position gets one uniformly chosen real position masked; with
    probability ``last_prob`` a sequence instead has exactly its last real position masked.
    Padding is never masked; labels are non-zero only at masked positions.
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


def full_softmax_loss(model: HistoryEncoder, params, hidden: Array, labels: Array, label_mask: Array):
    """Masked cross-entropy over the whole catalogue; returns ``(loss, accuracy)``."""
    logits = model.apply(params, hidden, method=HistoryEncoder.logits)
    logits = jnp.where(valid_item_mask(model.config.num_items), logits, NEG)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    denom = jnp.maximum(label_mask.sum(), 1.0)
    acc = ((jnp.argmax(logits, -1) == labels) * label_mask).sum() / denom
    return (ce * label_mask).sum() / denom, acc


def sampled_softmax_loss(
    model: HistoryEncoder, params, hidden: Array, labels: Array, label_mask: Array, key: Array, num_negatives: int
):
    """Sampled softmax: the positive against ``num_negatives`` uniform negatives shared by the batch.

    Negatives equal to the label (accidental hits) are masked.  Uniform sampling makes the usual
    ``log Q`` correction a constant, so it is omitted.  Returns ``(loss, accuracy among candidates)``.
    """
    V = model.config.num_items
    neg = jax.random.randint(key, (num_negatives,), 1, V)
    cand = jnp.concatenate([labels[..., None], jnp.broadcast_to(neg, labels.shape + (num_negatives,))], -1)
    logits = model.apply(params, hidden, cand, method=HistoryEncoder.candidate_logits)
    hit = jnp.concatenate([jnp.zeros(labels.shape + (1,), bool), neg == labels[..., None]], -1)
    logits = jnp.where(hit, NEG, logits)
    ce = -jax.nn.log_softmax(logits, -1)[..., 0]
    denom = jnp.maximum(label_mask.sum(), 1.0)
    acc = ((jnp.argmax(logits, -1) == 0) * label_mask).sum() / denom
    return (ce * label_mask).sum() / denom, acc


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Training hyper-parameters of :func:`pretrain`.

    Attributes:
      mask_prob: probability of masking a real position.
      last_prob: probability that a sequence has only its last item masked.
      num_negatives: 0 = full softmax; otherwise sampled softmax with this many negatives.
      batch_size, epochs, lr, weight_decay, warmup_frac, clip_norm: optimisation (AdamW, linear
        warm-up then cosine decay, global-norm clipping).
      seed: PRNG seed of initialisation, masking, dropout and batch order.
    """

    mask_prob: float = 0.2
    last_prob: float = 0.1
    num_negatives: int = 0
    batch_size: int = 64
    epochs: int = 20
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    clip_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.mask_prob <= 1.0:
            raise ValueError(f"PretrainConfig.mask_prob must be in (0, 1], got {self.mask_prob}")
        if not 0.0 <= self.last_prob <= 1.0:
            raise ValueError(f"PretrainConfig.last_prob must be in [0, 1], got {self.last_prob}")
        if self.num_negatives < 0 or self.batch_size < 1 or self.epochs < 0:
            raise ValueError("PretrainConfig: num_negatives >= 0, batch_size >= 1 and epochs >= 0 required")


def init_encoder(key: Array, config: EncoderConfig):
    """Random encoder parameters ``{"params": ...}``."""
    L = config.max_len
    z = jnp.zeros((1, L), jnp.int32)
    return HistoryEncoder(config).init(key, z, jnp.zeros((1, L)), jnp.ones((1, L)))


def make_optimizer(pcfg: PretrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warm-up, cosine decay and gradient clipping."""
    total = max(int(total_steps), 1)
    sched = optax.warmup_cosine_decay_schedule(
        0.0, pcfg.lr, max(1, int(pcfg.warmup_frac * total)), total, end_value=0.1 * pcfg.lr
    )
    return optax.chain(optax.clip_by_global_norm(pcfg.clip_norm), optax.adamw(sched, weight_decay=pcfg.weight_decay))


def make_loss_fn(config: EncoderConfig, pcfg: PretrainConfig) -> Callable:
    """``loss_fn(params, items, ratings, mask, key) -> (loss, metrics)`` of one batch."""
    model = HistoryEncoder(config)

    def loss_fn(params, items, ratings, mask, key):
        km, kd, kn = jax.random.split(key, 3)
        b = mask_items(km, items, ratings, mask, pcfg.mask_prob, config.mask_token, pcfg.last_prob)
        h = model.apply(params, b.items, b.ratings, b.mask, deterministic=False, rngs={"dropout": kd})
        if pcfg.num_negatives:
            loss, acc = sampled_softmax_loss(model, params, h, b.labels, b.label_mask, kn, pcfg.num_negatives)
        else:
            loss, acc = full_softmax_loss(model, params, h, b.labels, b.label_mask)
        return loss, {"loss": loss, "acc": acc}

    return loss_fn


def make_pretrain_step(config: EncoderConfig, pcfg: PretrainConfig, optimizer: optax.GradientTransformation):
    """``step(params, opt_state, items, ratings, mask, key) -> (params, opt_state, metrics)`` (pure)."""
    loss_fn = make_loss_fn(config, pcfg)

    def step(params, opt_state, items, ratings, mask, key):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, items, ratings, mask, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


def make_train_epoch(config: EncoderConfig, pcfg: PretrainConfig, optimizer):
    """Jitted ``epoch(params, opt_state, seqs, batch_idx [nb, B], key) -> (params, opt_state, metrics [nb])``:
    one ``lax.scan`` over the batches of an epoch, data staying on device."""
    step = make_pretrain_step(config, pcfg, optimizer)

    @jax.jit
    def epoch(params, opt_state, seqs: Sequences, batch_idx, key):
        def body(carry, xs):
            p, o = carry
            idx, i = xs
            p, o, m = step(p, o, seqs.items[idx], seqs.ratings[idx], seqs.mask[idx], jax.random.fold_in(key, i))
            return (p, o), m

        (params, opt_state), metrics = jax.lax.scan(
            body, (params, opt_state), (batch_idx, jnp.arange(batch_idx.shape[0]))
        )
        return params, opt_state, metrics

    return epoch


@functools.lru_cache(maxsize=8)
def _compiled_epoch(config: EncoderConfig, pcfg: PretrainConfig, total_steps: int):
    """``(optimizer, jitted epoch)`` shared by :func:`pretrain` calls with the same configuration (a
    resumed or repeated run does not compile again)."""
    opt = make_optimizer(pcfg, total_steps)
    return opt, make_train_epoch(config, pcfg, opt)


def pretrain(
    seqs: Sequences,
    config: EncoderConfig,
    pcfg: PretrainConfig,
    val: Sequences | None = None,
    eval_every: int = 0,
    log_fn: Callable[[dict], None] | None = None,
    params=None,
    checkpointer=None,
    resume: bool = False,
):
    """Train the encoder with the masked-item objective.

    Batches are drawn per epoch in a seeded random order (``default_rng(pcfg.seed + epoch)``); the
    last incomplete batch is filled with randomly repeated users so every batch has one static shape.
    ``val`` (from :func:`holdout_split`) is evaluated every ``eval_every`` epochs and at the end.

    Returns ``(params, history)``: ``history`` is a list of per-epoch dicts (``epoch``, ``loss``,
    ``acc`` and, when evaluated, ``val_*`` metrics of :func:`evaluate_next_item`).

    With a ``checkpointer`` (:class:`metarec.training.checkpoint.Checkpointer`) the full training state
    (``params``, ``opt_state``, PRNG ``key``; checkpoint step = completed epochs, meta = history and
    the run's configuration) is saved atomically at the end of every epoch, after ``log_fn``. With
    ``resume`` training continues from the newest checkpoint (a fresh start if there is none) and
    ends with the same params and history as an uninterrupted run: the batch order and the per-epoch
    keys are pure functions of ``(seed, epoch)``. A checkpoint written for another model, training
    config or number of sequences is refused with ``ValueError``.
    """
    if seqs.length > config.max_len:
        raise ValueError(f"sequences have length {seqs.length} > encoder max_len={config.max_len}")
    U = seqs.num_users
    if U == 0:
        raise ValueError("pretrain: no training sequences")
    B = min(pcfg.batch_size, U)
    nb = -(-U // B)
    key = jax.random.PRNGKey(pcfg.seed)
    k_init, k_train = jax.random.split(key)
    if params is None:
        params = init_encoder(k_init, config)
    opt, epoch_fn = _compiled_epoch(config, pcfg, nb * pcfg.epochs)
    opt_state = opt.init(params)
    dev = jax.tree_util.tree_map(jnp.asarray, seqs)
    history: list[dict] = []
    start = 0
    run_id = {"encoder": config.to_dict(), "pretrain": dataclasses.asdict(pcfg), "num_users": int(U)}
    if checkpointer is not None and resume and checkpointer.latest_step() is not None:
        step = checkpointer.latest_step()
        like = {"params": params, "opt_state": opt_state, "key": k_train}
        saved_meta = checkpointer.restore_meta(step)
        saved_id = saved_meta.get("run", {})
        diff = sorted(k for k in set(run_id) | set(saved_id) if json.loads(json.dumps(run_id.get(k))) != saved_id.get(k))
        if diff:
            raise ValueError(
                f"{checkpointer.directory}: the checkpoint of epoch {step} was written for another pretraining "
                f"run (differs in {', '.join(diff)}); resume with the original settings or use a fresh workdir"
            )
        state, saved_meta = checkpointer.restore(step, like)
        # as fresh (uncommitted) device arrays, so the jitted epoch is not compiled again
        state = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), state)
        params, opt_state, k_train = state["params"], state["opt_state"], state["key"]
        start, history = int(saved_meta["epoch"]), list(saved_meta["history"])
    for e in range(start, pcfg.epochs):
        rng = np.random.default_rng(pcfg.seed + e)
        order = rng.permutation(U)
        fill = rng.choice(U, nb * B - U, replace=True) if nb * B > U else np.zeros(0, int)
        batch_idx = np.concatenate([order, fill]).reshape(nb, B)
        params, opt_state, m = epoch_fn(params, opt_state, dev, jnp.asarray(batch_idx), jax.random.fold_in(k_train, e))
        rec = {"epoch": e + 1, "loss": float(m["loss"].mean()), "acc": float(m["acc"].mean())}
        if val is not None and val.num_users and (
            (eval_every and (e + 1) % eval_every == 0) or e + 1 == pcfg.epochs
        ):
            rec.update({f"val_{k}": v for k, v in evaluate_next_item(params, config, val).items()})
        if not (np.isfinite(rec["loss"]) and np.isfinite(rec["acc"])):
            last = None if checkpointer is None else checkpointer.latest_step()
            raise FloatingPointError(
                f"pretrain: non-finite loss in epoch {e + 1} (loss {rec['loss']}, acc {rec['acc']}); "
                + ("no checkpoint was kept" if last is None else
                   f"the last good state (epoch {last}) is kept in {checkpointer.directory}")
                + "; lower the learning rate or --clip_norm and rerun (with --resume to continue)"
            )
        history.append(rec)
        if log_fn is not None:
            log_fn(rec)
        if checkpointer is not None:
            state = {"params": params, "opt_state": opt_state, "key": k_train}
            checkpointer.save(e + 1, state, {"epoch": e + 1, "history": history, "run": run_id})
    return params, history


# ---------------------------------------------------------------------------------------------
# Next-item scoring and evaluation
# ---------------------------------------------------------------------------------------------


def append_mask_token(items: Array, ratings: Array, mask: Array, mask_token: int):
    """Append ``[MASK]`` after the last real position (shifting a full sequence left by one).

    Returns ``(items, ratings, mask, pos)`` where ``pos [B]`` is the position of the ``[MASK]``.
    """
    L = items.shape[-1]
    n = mask.sum(-1).astype(jnp.int32)
    full = (n >= L)[..., None]
    roll = lambda a: jnp.where(full, jnp.roll(a, -1, axis=-1), a)  # noqa: E731
    items, ratings, mask = roll(items), roll(ratings), roll(mask)
    pos = jnp.minimum(n, L - 1)
    at = jax.nn.one_hot(pos, L, dtype=bool)
    return (
        jnp.where(at, mask_token, items).astype(jnp.int32),
        jnp.where(at, 0.0, ratings),
        jnp.where(at, 1.0, mask),
        pos,
    )


def next_item_logits(params, config: EncoderConfig, items: Array, ratings: Array, mask: Array) -> Array:
    """Scores ``[B, num_items + 1]`` of the item following each history (``[MASK]`` appended);
    invalid tokens (OOV, ``[MASK]``) get ``-1e9``."""
    model = HistoryEncoder(config)
    it, rt, mk, pos = append_mask_token(items, ratings, mask, config.mask_token)
    h = model.apply(params, it, rt, mk)
    h_last = jnp.take_along_axis(h, pos[:, None, None], axis=1)[:, 0]
    logits = model.apply(params, h_last, method=HistoryEncoder.logits)
    return jnp.where(valid_item_mask(config.num_items), logits, NEG)


def ranking_metrics(scores: Array, relevant: Array, k: int = 10) -> dict[str, Array]:
    """Per-row full-catalogue ranking metrics from ``scores [B, V]`` and binary ``relevant [B, V]``.

    ``hr@k`` (any relevant item in the top k), ``recall@k`` (relevant in top k / min(k, #relevant)),
    ``ndcg@k`` (binary gain, ``1/log2(rank+1)`` discount, ideal = all relevant first) and ``acc``
    (top-1 is relevant).  Ties are broken by the lower item index (``lax.top_k``).  Rows with no
    relevant item give 0.
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


def evaluate_next_item(
    params, config: EncoderConfig, val: Sequences, k: int = 10, exclude_seen: bool = True, batch_size: int = 256
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
            logits = _exclude_items(logits, it, mk)
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


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

CONFIG_FILE = "encoder_config.json"
PARAMS_DIR = "params"
ITEMS_FILE = "item_ids.npy"


def save_pretrained(
    path: str,
    params,
    config: EncoderConfig,
    item_ids: np.ndarray | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Write an encoder checkpoint directory: ``params/`` (orbax ``StandardCheckpointer``),
    ``encoder_config.json`` (the :class:`EncoderConfig` plus ``metadata``) and optionally
    ``item_ids.npy`` (raw item id of every vocabulary index, for checking the indexing at load time).
    Returns the absolute path."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, PARAMS_DIR)):
        if not overwrite:
            raise FileExistsError(f"checkpoint {path} already exists (pass overwrite=True to replace it)")
        import shutil

        shutil.rmtree(os.path.join(path, PARAMS_DIR))
    os.makedirs(path, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, PARAMS_DIR), jax.device_get(params))
    ckpt.wait_until_finished()
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"encoder": config.to_dict(), "metadata": dict(metadata or {})}, f, indent=1, default=str)
    if item_ids is not None:
        np.save(os.path.join(path, ITEMS_FILE), np.asarray(item_ids, np.int64))
    return path


def load_pretrained(path: str, with_metadata: bool = False):
    """Load a checkpoint written by :func:`save_pretrained`.

    Returns ``(config, params)`` (``params`` is ``{"params": ...}`` as produced by
    :func:`init_encoder`), or ``(config, params, info)`` with ``with_metadata`` where ``info`` has
    ``metadata`` and ``item_ids`` (or None).
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    cfg_file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{cfg_file} not found: {path} is not a checkpoint written by save_pretrained")
    try:
        with open(cfg_file) as f:
            blob = json.load(f)
        config = EncoderConfig.from_dict(blob["encoder"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: invalid encoder config ({e})") from e
    target = jax.eval_shape(lambda: init_encoder(jax.random.PRNGKey(0), config))
    params = ocp.StandardCheckpointer().restore(os.path.join(path, PARAMS_DIR), target)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    if not with_metadata:
        return config, params
    items_file = os.path.join(path, ITEMS_FILE)
    info = {
        "metadata": blob.get("metadata", {}),
        "item_ids": np.load(items_file) if os.path.exists(items_file) else None,
    }
    return config, params, info


# ---------------------------------------------------------------------------------------------
# Pipeline on a cold-start split: pretrain on training users only
# ---------------------------------------------------------------------------------------------


def item_ids_of_vocab(encoder) -> np.ndarray:
    """Raw item id of every index of a fitted ``FeatureEncoder``'s item vocabulary (``-1`` for the
    OOV index 0 and unused capacity)."""
    vocab = encoder.vocabs["item_id"]
    ids = np.full(encoder.spec.item_vocab[1], -1, np.int64)
    for tok, i in vocab.index.items():
        ids[i] = int(tok)
    return ids


def pretrain_on_split(
    train_ratings,
    encoder,
    enc_cfg: EncoderConfig,
    pcfg: PretrainConfig,
    val_fraction: float = 0.1,
    log_fn: Callable[[dict], None] | None = None,
    checkpointer=None,
    resume: bool = False,
):
    """Masked-item pretraining on a split's training ratings only.

    ``train_ratings`` must be the split's training frame (``Split.train_ratings``: warm-train users x
    existing items — no test user, no new item); items are indexed with the fitted ``encoder``'s
    item vocabulary so the result plugs into :func:`metarec.models.transformer.make_transformer_rater`.
    A ``val_fraction`` of those users (seeded by ``pcfg.seed``) has its last item held out for
    evaluation.  ``checkpointer`` / ``resume``: per-epoch training state, see :func:`pretrain`.
    Returns ``(params, history, val_metrics)``.
    """
    if enc_cfg.num_items != encoder.spec.item_vocab[1]:
        raise ValueError(
            f"EncoderConfig.num_items={enc_cfg.num_items} but the feature encoder's item vocabulary has "
            f"{encoder.spec.item_vocab[1]} entries"
        )
    seqs = build_sequences(train_ratings, encoder.vocabs["item_id"].encode, enc_cfg.max_len)
    train, val = holdout_split(seqs, val_fraction, pcfg.seed)
    params, history = pretrain(train, enc_cfg, pcfg, val=val if val.num_users else None, log_fn=log_fn,
                               checkpointer=checkpointer, resume=resume)
    val_metrics = {k[4:]: v for k, v in history[-1].items() if k.startswith("val_")} if history else {}
    return params, history, val_metrics


def support_ranking(
    params, config: EncoderConfig, tasks, k: int = 10, exclude_support: bool = True, batch_size: int = 128
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
    q_items = np.asarray(tasks.query.x["item"][..., 1])
    q_mask = np.asarray(tasks.query.mask) > 0
    V1 = config.num_items + 1
    rel = np.zeros((len(hi), V1), bool)
    rows = np.repeat(np.arange(len(hi)), q_items.shape[1])
    ok = q_mask.reshape(-1) & (q_items.reshape(-1) > 0)
    rel[rows[ok], q_items.reshape(-1)[ok]] = True
    keep = rel.any(1)

    @jax.jit
    def score(it, rt, mk, rl):
        logits = next_item_logits(params, config, it, rt, mk)
        if exclude_support:
            logits = _exclude_items(logits, it, mk)
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
    q_items = np.asarray(tasks.query.x["item"][..., 1])
    q_mask = np.asarray(tasks.query.mask) > 0
    scores = np.broadcast_to(pop, (len(hi), V1)).copy()
    r = np.repeat(np.arange(len(hi)), hi.shape[1])
    scores[r[hm.reshape(-1) > 0], hi.reshape(-1)[hm.reshape(-1) > 0]] = NEG
    rel = np.zeros_like(scores, bool)
    rq = np.repeat(np.arange(len(hi)), q_items.shape[1])
    ok = q_mask.reshape(-1) & (q_items.reshape(-1) > 0)
    rel[rq[ok], q_items.reshape(-1)[ok]] = True
    keep = rel.any(1)
    m = ranking_metrics(jnp.asarray(scores[keep]), jnp.asarray(rel[keep]), k)
    res = {key: float(np.mean(v)) for key, v in m.items() if key != "acc"}
    res["n"] = int(keep.sum())
    return res


# ---------------------------------------------------------------------------------------------
# The large-model comparison (experiments/large_model.py)
# ---------------------------------------------------------------------------------------------

LARGE_METHODS = ("melu_maml", "tf_scratch_maml", "tf_pre_finetune", "tf_pre_maml")


def large_model_config():
    """Defaults of the comparison: small enough for a few minutes on a 2-core CPU."""
    from metarec import coldstart

    c = coldstart.default_config()
    c.seeds = [0]
    c.methods = list(LARGE_METHODS)
    c.epochs = 8
    c.patience = 4
    c.inner_steps = 3
    c.inner_lr = 0.05
    c.meta_batch = 32
    # encoder
    c.width = 64
    c.depth = 2
    c.heads = 2
    c.max_len = 100
    c.dropout = 0.1
    c.causal = False
    # pretraining
    c.pretrain_epochs = 30
    c.pretrain_batch = 64
    c.pretrain_lr = 2e-3
    c.mask_prob = 0.2
    c.num_negatives = 0
    c.pretrain_val_fraction = 0.1
    c.init_from = ""  # existing checkpoint to use instead of pretraining per seed
    # rater
    c.rater_adapt = "head"
    c.lora_rank = 0
    c.item_dim = 32
    c.head_hidden = [64, 32]
    c.rank_k = 10
    return c


def _rater_config(cfg, spec, enc_cfg):
    from metarec.models.transformer import RaterConfig

    return RaterConfig(
        encoder=enc_cfg, n_years=spec.item_vocab[0], n_genres=spec.n_genres, item_dim=cfg.item_dim,
        head_hidden=tuple(cfg.head_hidden), lora_rank=cfg.lora_rank,
    )  # fmt: skip


def run_large_model_seed(data, seed: int, cfg, log_fn: Callable = print) -> dict:
    """One seed of the comparison: ``{scenario: {method: metrics}}`` plus ``_ranking`` and ``_info``."""
    import time as _time

    from metarec import coldstart
    from metarec.meta import make_learner
    from metarec.models.transformer import EncoderConfig, add_history, adapt_filter, make_transformer_rater
    from metarec.meta.step import make_eval_fn, make_meta_step

    t_start = _time.time()
    sd = coldstart.prepare_seed(data, seed, cfg)
    spec, scale = sd.encoder.spec, data.rating_scale
    width = sd.train.support.y.shape[1]
    enc_cfg = EncoderConfig(
        num_items=spec.item_vocab[1], max_len=max(cfg.max_len, width), width=cfg.width, depth=cfg.depth,
        heads=cfg.heads, dropout_rate=cfg.dropout, causal=cfg.causal,
    )  # fmt: skip
    info: dict = {"seconds": {}, "histories": {}}
    # 1. pretraining on the training users only (warm_train x existing items; validation users of the
    #    meta-learning split are part of warm_train, test users never are).
    t0 = _time.time()
    if cfg.init_from:
        cfg_loaded, enc_params, meta = load_pretrained(cfg.init_from, with_metadata=True)
        ids = meta["item_ids"]
        if ids is not None and not np.array_equal(ids, item_ids_of_vocab(sd.encoder)):
            raise ValueError(
                f"--init_from={cfg.init_from}: its item vocabulary differs from seed {seed}'s feature encoder; "
                "pretrain with the same dataset and seed (experiments/pretrain.py --seed)"
            )
        enc_cfg, pre_val = cfg_loaded, meta["metadata"].get("val", {})
    else:
        pcfg = PretrainConfig(
            mask_prob=cfg.mask_prob, num_negatives=cfg.num_negatives, batch_size=cfg.pretrain_batch,
            epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, seed=seed,
        )  # fmt: skip
        enc_params, hist, pre_val = pretrain_on_split(
            sd.split.train_ratings, sd.encoder, enc_cfg, pcfg, cfg.pretrain_val_fraction
        )
        info["histories"]["pretrain"] = hist
    info["seconds"]["pretrain"] = _time.time() - t0
    info["pretrain_val"] = pre_val
    log_fn(f"seed {seed} pretrain: held-out next item {pre_val} ({info['seconds']['pretrain']:.1f}s)")

    train, val = add_history(sd.train), add_history(sd.val)
    test = {s: add_history(t) for s, t in sd.test.items()}
    results = {s: {} for s in coldstart.TEST_SCENARIOS}
    key = jax.random.PRNGKey(seed)
    opt = coldstart.make_optimizer(cfg)
    clip = cfg.clip_norm or None

    def fit_and_score(name, learner, apply_fn, init_params, k_train, train_learner=None):
        tl = train_learner or learner
        tr = coldstart.meta_train(
            tl, make_meta_step(tl, opt, clip_norm=clip), make_eval_fn(tl, apply_fn), init_params, train, val,
            cfg, k_train, scale,
        )  # fmt: skip
        info["histories"][name] = tr.history
        return tr

    rc = _rater_config(cfg, spec, enc_cfg)
    mask = adapt_filter(cfg.rater_adapt, depth=enc_cfg.depth)
    for name in cfg.methods:
        t0 = _time.time()
        key, k_init, k_train = jax.random.split(key, 3)
        if name == "melu_maml":
            fns = coldstart.Compiled(cfg)
            init_fn, apply_fn = fns.model(spec)
            learner = fns.learner(spec, "maml")
            tr = coldstart.meta_train(learner, fns.step(spec, "maml"), fns.eval(spec, "maml"), init_fn(k_init),
                                      sd.train, sd.val, cfg, k_train, scale)  # fmt: skip
            eval_fn, tasks = fns.eval(spec, "maml"), sd.test
        else:
            init_fn, apply_fn = make_transformer_rater(rc, init_from=None if name == "tf_scratch_maml" else {"params": enc_params["params"]})
            learner = make_learner("maml", apply_fn, inner_steps=cfg.inner_steps, inner_lr=cfg.inner_lr, adapt_mask=mask)
            if name == "tf_pre_finetune":
                plain = make_learner("maml", apply_fn, inner_steps=0, inner_lr=cfg.inner_lr)
                tr = fit_and_score(name, learner, apply_fn, init_fn(k_init), k_train, train_learner=plain)
                best = (np.inf, None, None)
                for lr in cfg.finetune_lrs:  # per-user fine-tuning step size chosen on validation users
                    lrn = make_learner("maml", apply_fn, inner_steps=cfg.inner_steps, inner_lr=lr, adapt_mask=mask)
                    out = coldstart.predict_tasks(make_eval_fn(lrn, apply_fn), tr.params, val, cfg.eval_chunk)
                    m = coldstart.score(out["pred"], val, scale, cfg.k)["mae"]
                    if m < best[0]:
                        best = (m, lrn, lr)
                learner = best[1]
                info["finetune_lr"] = best[2]
            else:
                tr = fit_and_score(name, learner, apply_fn, init_fn(k_init), k_train)
            eval_fn, tasks = make_eval_fn(learner, apply_fn), test
        for s, t in tasks.items():
            out = coldstart.predict_tasks(eval_fn, tr.params, t, cfg.eval_chunk)
            results[s][name] = coldstart.score(out["pred"], t, scale, cfg.k)
        info["seconds"][name] = _time.time() - t0
        log_fn(f"seed {seed} {name}: best epoch {tr.best_epoch}, val MAE {tr.best_val_mae:.4f}, {info['seconds'][name]:.1f}s")

    # next-item ranking over the full catalogue (scenarios with known query items)
    ranking = {}
    for s in ("warm_test", "user_cold"):
        ranking[s] = {
            "pretrained_encoder": support_ranking(enc_params, enc_cfg, test[s], k=cfg.rank_k),
            "popularity": popularity_ranking(sd.split.train_ratings, sd.encoder, test[s], k=cfg.rank_k),
        }
    results["_ranking"] = ranking
    info["seconds"]["total"] = _time.time() - t_start
    info["n_users"] = {s: int(t.num_tasks) for s, t in sd.test.items()}
    results["_info"] = info
    return results


def run_large_model(cfg, data=None, log_fn: Callable = print) -> dict:
    """All seeds; mean and sample std over seeds (PROTOCOL.md result layout, plus ``ranking``)."""
    from metarec import coldstart
    from metarec import data as mdata
    from metarec import metrics as mmetrics

    bad = [m for m in cfg.methods if m not in LARGE_METHODS]
    if bad:
        raise ValueError(f"unknown --methods {bad}; valid: {', '.join(LARGE_METHODS)}")
    if data is None:
        data = mdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, download=cfg.download)
    per_seed = {seed: run_large_model_seed(data, seed, cfg, log_fn) for seed in cfg.seeds}
    agg = lambda get: {  # noqa: E731
        m: mmetrics.mean_std_over_seeds([get(per_seed[s])[m] for s in cfg.seeds]) for m in get(per_seed[cfg.seeds[0]])
    }
    results = {
        s: {meth: agg(lambda r, s=s, meth=meth: r[s][meth]) for meth in per_seed[cfg.seeds[0]][s]}
        for s in coldstart.TEST_SCENARIOS
    }
    ranking = {
        s: {meth: agg(lambda r, s=s, meth=meth: r["_ranking"][s][meth]) for meth in per_seed[cfg.seeds[0]]["_ranking"][s]}
        for s in per_seed[cfg.seeds[0]]["_ranking"]
    }
    first = per_seed[cfg.seeds[0]]["_info"]
    return {
        "dataset": data.name, "protocol": cfg.protocol, "seeds": list(cfg.seeds), "config": cfg.to_dict(),
        "scenarios": {s: {"n_users": first["n_users"][s]} for s in coldstart.TEST_SCENARIOS},
        "results": results, "ranking": ranking,
        "training": {str(s): r["_info"] for s, r in per_seed.items()},
    }  # fmt: skip
