"""Training of the two-tower retrieval model (:mod:`metarec.models.two_tower`) on implicit positive
pairs, on the shared trainer: one piece per epoch, each epoch one jitted ``lax.scan``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metarec.models.two_tower import (
    Tables,
    TwoTowerConfig,
    init_two_tower,
    make_model,
    make_two_tower_loss,
)
from metarec.training import trainer


def train_two_tower(pairs: np.ndarray, tables: Tables, cfg: TwoTowerConfig, log_fn=None):
    """Train on positive ``pairs [P, 2]`` of (user row, item row).

    Returns ``(model, params, history)``; ``history`` holds the mean loss per epoch.  Seeded by
    ``cfg.seed`` (init, negatives and batch order: epoch ``e`` draws its order from
    ``default_rng(cfg.seed + e)``, the last incomplete batch filled with repeated pairs).
    """
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) == 0:
        raise ValueError(
            f"pairs must be a non-empty [P, 2] array of (user row, item row), got {pairs.shape}"
        )
    tables = jax.tree_util.tree_map(jnp.asarray, tables)
    model = make_model(tables, cfg)
    k_init, k_train = jax.random.split(jax.random.PRNGKey(cfg.seed))
    params = init_two_tower(k_init, model, tables)
    P = len(pairs)
    B = min(cfg.batch_size, P)
    nb = -(-P // B)
    opt = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = make_two_tower_loss(model, cfg)

    @jax.jit
    def epoch(params, opt_state, idx, key):
        def body(carry, xs):
            p, o = carry
            b, i = xs
            key_i = jax.random.fold_in(key, i)
            loss, g = jax.value_and_grad(loss_fn)(p, tables, b[:, 0], b[:, 1], key_i)
            u, o = opt.update(g, o, p)
            return (optax.apply_updates(p, u), o), loss

        xs = (idx, jnp.arange(idx.shape[0]))
        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), xs)
        return params, opt_state, losses.mean()

    def piece(state: trainer.LoopState):
        e = state.host["epoch"]
        rng = np.random.default_rng(cfg.seed + e)
        if nb * B > P:
            order = np.concatenate([rng.permutation(P), rng.choice(P, nb * B - P)])
        else:
            order = rng.permutation(P)
        idx = jnp.asarray(pairs[order].reshape(nb, B, 2))
        p, o, loss = epoch(*state.arrays, idx, jax.random.fold_in(k_train, e))
        rec = {"epoch": e + 1, "loss": float(loss)}
        if log_fn is not None:
            log_fn(rec)
        host = {"epoch": e + 1, "history": state.host["history"] + [rec]}
        done = e + 1 >= cfg.epochs
        return dataclasses.replace(state, arrays=(p, o), host=host, step=e + 1, done=done), None

    start = trainer.LoopState(
        (params, opt.init(params)), {"epoch": 0, "history": []}, done=cfg.epochs <= 0
    )
    state = trainer.run(piece, start)
    return model, state.arrays[0], state.host["history"]


__all__ = ["train_two_tower"]
