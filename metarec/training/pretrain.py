"""Masked-item pretraining (BERT4Rec-style) of :class:`metarec.models.transformer.HistoryEncoder`.

Pipeline: a ratings frame -> :func:`metarec.data.sequences.build_sequences` ->
:func:`~metarec.data.sequences.holdout_split` -> :func:`pretrain` (whole epochs jitted as one
``lax.scan``, run by the resumable trainer :mod:`metarec.training.trainer`) ->
:func:`metarec.training.next_item.evaluate_next_item` -> :mod:`metarec.training.encoder_checkpoint`.

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
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metarec.data.sequences import Sequences, build_sequences, holdout_split, mask_items
from metarec.models.transformer import (
    NEG,
    EncoderConfig,
    HistoryEncoder,
    init_encoder,
    valid_item_mask,
)
from metarec.training import trainer
from metarec.training.next_item import evaluate_next_item

Array = jax.Array


def full_softmax_loss(
    model: HistoryEncoder, params, hidden: Array, labels: Array, label_mask: Array
):
    """Masked cross-entropy over the whole catalogue; returns ``(loss, accuracy)``."""
    logits = model.apply(params, hidden, method=HistoryEncoder.logits)
    logits = jnp.where(valid_item_mask(model.config.num_items), logits, NEG)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    denom = jnp.maximum(label_mask.sum(), 1.0)
    acc = ((jnp.argmax(logits, -1) == labels) * label_mask).sum() / denom
    return (ce * label_mask).sum() / denom, acc


def sampled_softmax_loss(
    model: HistoryEncoder,
    params,
    hidden: Array,
    labels: Array,
    label_mask: Array,
    key: Array,
    num_negatives: int,
):
    """Sampled softmax: the positive against ``num_negatives`` uniform negatives shared by the
    batch.

    Negatives equal to the label (accidental hits) are masked.  Uniform sampling makes the usual
    ``log Q`` correction a constant, so it is omitted.  Returns ``(loss, accuracy among
    candidates)``.
    """
    V = model.config.num_items
    neg = jax.random.randint(key, (num_negatives,), 1, V)
    negs = jnp.broadcast_to(neg, labels.shape + (num_negatives,))
    cand = jnp.concatenate([labels[..., None], negs], -1)
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
            raise ValueError(
                "PretrainConfig: num_negatives >= 0, batch_size >= 1 and epochs >= 0 required"
            )


def make_optimizer(pcfg: PretrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warm-up, cosine decay and gradient clipping."""
    total = max(int(total_steps), 1)
    sched = optax.warmup_cosine_decay_schedule(
        0.0, pcfg.lr, max(1, int(pcfg.warmup_frac * total)), total, end_value=0.1 * pcfg.lr
    )
    return optax.chain(
        optax.clip_by_global_norm(pcfg.clip_norm),
        optax.adamw(sched, weight_decay=pcfg.weight_decay),
    )


def make_loss_fn(config: EncoderConfig, pcfg: PretrainConfig) -> Callable:
    """``loss_fn(params, items, ratings, mask, key) -> (loss, metrics)`` of one batch."""
    model = HistoryEncoder(config)

    def loss_fn(params, items, ratings, mask, key):
        km, kd, kn = jax.random.split(key, 3)
        b = mask_items(km, items, ratings, mask, pcfg.mask_prob, config.mask_token, pcfg.last_prob)
        h = model.apply(
            params, b.items, b.ratings, b.mask, deterministic=False, rngs={"dropout": kd}
        )
        if pcfg.num_negatives:
            loss, acc = sampled_softmax_loss(
                model, params, h, b.labels, b.label_mask, kn, pcfg.num_negatives
            )
        else:
            loss, acc = full_softmax_loss(model, params, h, b.labels, b.label_mask)
        return loss, {"loss": loss, "acc": acc}

    return loss_fn


def make_pretrain_step(
    config: EncoderConfig, pcfg: PretrainConfig, optimizer: optax.GradientTransformation
):
    """``step(params, opt_state, items, ratings, mask, key) -> (params, opt_state, metrics)``."""
    loss_fn = make_loss_fn(config, pcfg)

    def step(params, opt_state, items, ratings, mask, key):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, items, ratings, mask, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


def make_train_epoch(config: EncoderConfig, pcfg: PretrainConfig, optimizer):
    """Jitted ``epoch(params, opt_state, seqs, batch_idx [nb, B], key) -> (params, opt_state,
    metrics [nb])``: one ``lax.scan`` over the batches of an epoch, data staying on device."""
    step = make_pretrain_step(config, pcfg, optimizer)

    @jax.jit
    def epoch(params, opt_state, seqs: Sequences, batch_idx, key):
        def body(carry, xs):
            p, o = carry
            idx, i = xs
            batch = (seqs.items[idx], seqs.ratings[idx], seqs.mask[idx])
            p, o, m = step(p, o, *batch, jax.random.fold_in(key, i))
            return (p, o), m

        xs = (batch_idx, jnp.arange(batch_idx.shape[0]))
        (params, opt_state), metrics = jax.lax.scan(body, (params, opt_state), xs)
        return params, opt_state, metrics

    return epoch


@functools.lru_cache(maxsize=8)
def _compiled_epoch(config: EncoderConfig, pcfg: PretrainConfig, total_steps: int):
    """``(optimizer, jitted epoch)`` shared by :func:`pretrain` calls with the same configuration (a
    resumed or repeated run does not compile again)."""
    opt = make_optimizer(pcfg, total_steps)
    return opt, make_train_epoch(config, pcfg, opt)


def epoch_batches(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """``[nb, B]`` sequence indices of one epoch: a permutation drawn with
    ``default_rng(seed + epoch)``, the last incomplete batch filled with randomly repeated users so
    that every batch has one static shape."""
    nb = -(-n // batch_size)
    rng = np.random.default_rng(seed + epoch)
    order = rng.permutation(n)
    size = nb * batch_size
    fill = rng.choice(n, size - n, replace=True) if size > n else np.zeros(0, int)
    return np.concatenate([order, fill]).reshape(nb, batch_size)


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

    Batches are drawn per epoch by :func:`epoch_batches`. ``val`` (from ``holdout_split``) is
    evaluated every ``eval_every`` epochs and at the end.

    Returns ``(params, history)``: ``history`` is a list of per-epoch dicts (``epoch``, ``loss``,
    ``acc`` and, when evaluated, ``val_*`` metrics of :func:`evaluate_next_item`).

    Runs on :func:`metarec.training.trainer.run`, one piece per epoch. With a ``checkpointer``
    (:class:`metarec.training.checkpoint.Checkpointer`) the training state (``params``,
    ``opt_state``, PRNG ``key``; checkpoint step = completed epochs; host state = epoch and
    history) is saved atomically at the end of every epoch, after ``log_fn``. With ``resume``
    training continues from the newest checkpoint (a fresh start if there is none) and ends with
    the same params and history as an uninterrupted run: the batch order and the per-epoch keys are
    pure functions of ``(seed, epoch)``. A checkpoint written for another model, training config or
    number of sequences is refused with ``ValueError``. A non-finite loss or accuracy raises
    :class:`~metarec.training.trainer.NonFiniteLossError` before that epoch is saved.
    """
    if seqs.length > config.max_len:
        raise ValueError(f"sequences have length {seqs.length} > encoder max_len={config.max_len}")
    U = seqs.num_users
    if U == 0:
        raise ValueError("pretrain: no training sequences")
    B = min(pcfg.batch_size, U)
    nb = -(-U // B)
    k_init, k_train = jax.random.split(jax.random.PRNGKey(pcfg.seed))
    if params is None:
        params = init_encoder(k_init, config)
    opt, epoch_fn = _compiled_epoch(config, pcfg, nb * pcfg.epochs)
    dev = jax.tree_util.tree_map(jnp.asarray, seqs)
    ident = {"encoder": config.to_dict(), "pretrain": dataclasses.asdict(pcfg), "num_users": int(U)}

    def init() -> trainer.LoopState:
        arrays = {"params": params, "opt_state": opt.init(params), "key": k_train}
        return trainer.LoopState(arrays, {"epoch": 0, "history": []}, done=pcfg.epochs == 0)

    def piece(state: trainer.LoopState):
        e, arrays = state.host["epoch"], state.arrays
        batch_idx = jnp.asarray(epoch_batches(pcfg.seed, e, U, B))
        key = jax.random.fold_in(arrays["key"], e)
        p, o, m = epoch_fn(arrays["params"], arrays["opt_state"], dev, batch_idx, key)
        rec = {"epoch": e + 1, "loss": float(m["loss"].mean()), "acc": float(m["acc"].mean())}
        last = e + 1 == pcfg.epochs
        due = last or bool(eval_every and (e + 1) % eval_every == 0)
        if val is not None and val.num_users and due:
            rec.update({f"val_{k}": v for k, v in evaluate_next_item(p, config, val).items()})
        if not (np.isfinite(rec["loss"]) and np.isfinite(rec["acc"])):
            what = f"non-finite loss in epoch {e + 1} (loss {rec['loss']}, acc {rec['acc']})"
            raise trainer.non_finite_error(
                f"pretrain: {what}",
                e + 1,
                checkpointer,
                unit="epoch",
                hint="lower the learning rate (lr) or the gradient clipping norm (clip_norm)",
            )
        history = state.host["history"] + [rec]
        if log_fn is not None:
            log_fn(rec)
        arrays = {"params": p, "opt_state": o, "key": arrays["key"]}
        host = {"epoch": e + 1, "history": history}
        return dataclasses.replace(state, arrays=arrays, host=host, step=e + 1, done=last), None

    state, _ = trainer.restore_or_init(
        init, checkpointer=checkpointer, resume=resume, ident=ident, what="pretraining run"
    )
    state = trainer.run(piece, state, checkpointer=checkpointer, ident=ident)
    return state.arrays["params"], list(state.host["history"])


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

    ``train_ratings`` must be the split's training frame (``Split.train_ratings``: warm-train users
    x existing items — no test user, no new item); items are indexed with the fitted ``encoder``'s
    item vocabulary so the result plugs into
    :func:`metarec.models.transformer.make_transformer_rater`.
    A ``val_fraction`` of those users (seeded by ``pcfg.seed``) has its last item held out for
    evaluation.  ``checkpointer`` / ``resume``: per-epoch training state, see :func:`pretrain`.
    Returns ``(params, history, val_metrics)``.
    """
    if enc_cfg.num_items != encoder.spec.item_vocab[1]:
        raise ValueError(
            f"EncoderConfig.num_items={enc_cfg.num_items} but the feature encoder's item "
            f"vocabulary has {encoder.spec.item_vocab[1]} entries"
        )
    seqs = build_sequences(train_ratings, encoder.vocabs["item_id"].encode, enc_cfg.max_len)
    train, val = holdout_split(seqs, val_fraction, pcfg.seed)
    params, history = pretrain(
        train,
        enc_cfg,
        pcfg,
        val=val if val.num_users else None,
        log_fn=log_fn,
        checkpointer=checkpointer,
        resume=resume,
    )
    last = history[-1] if history else {}
    val_metrics = {k[4:]: v for k, v in last.items() if k.startswith("val_")}
    return params, history, val_metrics


__all__ = [
    "PretrainConfig",
    "epoch_batches",
    "full_softmax_loss",
    "make_loss_fn",
    "make_optimizer",
    "make_pretrain_step",
    "make_train_epoch",
    "pretrain",
    "pretrain_on_split",
    "sampled_softmax_loss",
]
