"""Federated meta-learning: client updates vmapped over a client axis, server aggregation with an
optax optimizer, dropped clients, stragglers and optional DP-FedAvg. Pure functions of explicit
state; a round survives ``jit`` (and its client update ``vmap``).

A round (:func:`make_round`) takes the server's meta-parameters and, for ``C`` client slots,
task batches ``[C, S, B, ...]`` with weights ``[C, S, B]`` (``S`` local steps of ``B`` tasks; a
weight is 1.0 for a real task, 0.0 for padding), ``participating [C]`` (0: the client was not
sampled or dropped out: it contributes nothing) and ``steps_done [C]`` (a straggler completes only
its first ``s`` of the ``S`` local steps; the rest are masked). Then:

1. client update (:func:`make_client_update`), from the server's parameters ``θ``: for
   ``j < steps_done``, ``θ_{j+1} = θ_j - local_lr * g_j`` with ``g_j`` the weighted mean over the
   step's tasks of the learner's ``task_grad`` (via :func:`metarec.meta.step.weighted_task_grad`;
   a step without real tasks is skipped); the client sends ``Δ = θ_S - θ`` (accumulated as
   ``-local_lr * Σ g_j``) and its weight ``n`` = the number of real tasks in its completed steps.
2. aggregation: ``Δ̄ = Σ_c n_c Δ_c / Σ_c n_c`` over responding clients. With DP-FedAvg
   (``dp_clip``), each client's ``Δ_c`` is clipped to L2 norm ``dp_clip`` (its weight ignored),
   ``N(0, (dp_noise * dp_clip)^2)`` is added to the sum per coordinate and the sum is divided by
   the *expected* number of clients ``expected_clients`` (McMahan et al. 2018): one client's
   influence on the sum is at most ``dp_clip`` whatever its data
   (:mod:`metarec.meta.accounting` gives epsilon for Poisson client sampling).
3. server step: the pseudo-gradient ``-Δ̄`` goes through
   :func:`metarec.meta.step.finish_meta_step` (optional global-norm clip, finite guard that keeps
   the old parameters and optimizer state, optax update).

The algorithms are settings of this round:

==============  ============================================================================
fedmeta         FedMeta (Chen et al. 2018): ``S = 1``, ``local_lr = 1`` with the MAML or
                Meta-SGD learner: ``Δ_c = -g_c``, the client's meta-gradient; the server applies
                its optimizer to the task-weighted mean meta-gradient. One client with full
                participation is exactly :func:`metarec.meta.step.make_meta_step`.
perfedavg       Per-FedAvg (Fallah et al. 2020): ``S = τ`` local SGD steps at ``local_lr`` on
                the MAML objective (the learner's ``task_grad``: full second-order MAML /
                Meta-SGD, or first-order with a first-order learner); the server averages the
                model deltas (server SGD with lr 1 is plain FedAvg averaging; any optax optimizer
                on ``-Δ̄`` is the FedOpt family).
reptile         Reptile as FedAvg (Nichol et al. 2018; FedAvg's local SGD on a client's data is
                Reptile's inner loop): the Reptile learner (``task_grad = θ - φ_task``) or a
                plain learner (no inner loop), ``S`` local SGD steps, the server moves towards
                the clients' average with ``optax.sgd(server_lr)``.
==============  ============================================================================

:data:`ALGORITHMS` records the fixed local settings of each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metarec.meta.step import finish_meta_step, weighted_task_grad

PyTree = Any


class Algorithm(NamedTuple):
    """Fixed client settings of a named algorithm (None: free, set by the caller)."""

    local_steps: int | None
    local_lr: float | None
    description: str


ALGORITHMS = {
    "fedmeta": Algorithm(1, 1.0, "clients send their meta-gradient; the server's optimizer steps"),
    "perfedavg": Algorithm(None, None, "local SGD on the MAML objective; the server averages"),
    "reptile": Algorithm(None, None, "local SGD on the Reptile/plain objective; FedAvg server"),
}


def client_settings(algorithm: str, local_steps: int, local_lr: float) -> tuple[int, float]:
    """``(local_steps, local_lr)`` of ``algorithm``: FedMeta's fixed (1, 1.0), else the given."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}; allowed: {', '.join(ALGORITHMS)}")
    a = ALGORITHMS[algorithm]
    return (
        local_steps if a.local_steps is None else a.local_steps,
        local_lr if a.local_lr is None else a.local_lr,
    )


def tree_size(tree: PyTree) -> int:
    """Number of scalar entries of a pytree (what one message of parameters carries)."""
    return int(sum(jnp.size(a) for a in jax.tree_util.tree_leaves(tree)))


def message_bytes(tree: PyTree, bytes_per_value: int = 4) -> int:
    """Bytes of one message carrying ``tree`` as float32 (parameters down, a delta up)."""
    return tree_size(tree) * bytes_per_value


def make_client_update(learner, *, local_lr: float, compute_dtype=None) -> Callable:
    """``client_update(params, tasks, weights, steps_done, keys=None) -> (delta, n, loss_sum)``
    for ONE client: ``tasks`` ``[S, B, ...]``, ``weights`` ``[S, B]``, ``steps_done`` (int; the
    local steps actually run, ``<= S``), ``keys`` ``[S, B]`` PRNG keys or None.

    ``delta`` is the accumulated ``-local_lr * Σ_j g_j`` (float32, ``params``' structure), ``n``
    the number of real tasks (sum of weights) in the completed steps, ``loss_sum`` the sum of their
    weighted losses (each at the parameters of its step)."""
    f = weighted_task_grad(learner, compute_dtype)

    def client_update(params, tasks, weights, steps_done, keys=None):
        n_steps = jnp.shape(weights)[0]
        zero = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)

        def body(delta, xs):
            j, t, w, k = xs
            w = jnp.asarray(w, jnp.float32)
            p = jax.tree_util.tree_map(lambda a, d: a + d.astype(jnp.result_type(a)), params, delta)
            if k is None:
                losses, grads = jax.vmap(lambda tt, ww: f(p, tt, ww, None))(t, w)
            else:
                losses, grads = jax.vmap(lambda tt, ww, kk: f(p, tt, ww, kk))(t, w, k)
            total = jnp.sum(w)
            denom = jnp.where(total > 0, total, 1.0)
            active = (j < steps_done) & (total > 0)
            new = jax.tree_util.tree_map(
                lambda d, g: jnp.where(active, d - local_lr * (jnp.sum(g, 0) / denom), d),
                delta,
                grads,
            )
            n = jnp.where(active, total, 0.0)
            return new, (n, jnp.where(active, jnp.sum(losses), 0.0))

        xs = (jnp.arange(n_steps), tasks, weights, keys)
        delta, (ns, ls) = jax.lax.scan(body, zero, xs)
        return delta, jnp.sum(ns), jnp.sum(ls)

    return client_update


def clip_tree(tree: PyTree, bound) -> tuple[PyTree, jax.Array]:
    """``tree`` scaled to global L2 norm at most ``bound``; returns ``(clipped, norm before)``."""
    norm = optax.tree.norm(tree)
    scale = jnp.minimum(1.0, bound / jnp.maximum(norm, 1e-12))
    return jax.tree_util.tree_map(lambda a: a * scale, tree), norm


def make_round(
    learner,
    server_optimizer: optax.GradientTransformation,
    *,
    local_lr: float,
    clip_norm: float | None = None,
    dp_clip: float | None = None,
    dp_noise: float = 0.0,
    expected_clients: float | None = None,
    compute_dtype=None,
    jit: bool = True,
) -> Callable:
    """Build ``round(params, opt_state, tasks, weights, participating, steps_done, key=None,
    noise_key=None) -> (params, opt_state, metrics)`` (see the module docstring).

    Args:
      learner: a :class:`metarec.meta.MetaLearner` (its ``task_grad`` is the client objective).
      server_optimizer: optax optimizer applied to the pseudo-gradient ``-Δ̄``.
      local_lr: client SGD step size (FedMeta: 1.0 with one local step).
      clip_norm: optional global-norm clip of the pseudo-gradient at the server.
      dp_clip: DP-FedAvg per-client L2 bound on ``Δ_c`` (None: no DP, task-weighted mean).
      dp_noise: noise multiplier ``σ`` (noise std ``σ * dp_clip`` on the sum); needs ``noise_key``.
      expected_clients: the divisor of the DP sum (``q * n_clients``); required with ``dp_clip``.

    ``key`` (optional) is split into one key per task slot (``[C, S, B]``, row-major), so one
    client with one local step uses the keys :func:`~metarec.meta.step.make_meta_step` uses.
    ``metrics``: ``loss`` (weighted mean task loss over the responding clients' tasks),
    ``grad_norm`` (norm of the pseudo-gradient before the server clip), ``finite``, ``weight``
    (the aggregation divisor), ``clients`` (responding clients), ``tasks`` (real tasks processed),
    ``delta_norm`` ``[C]`` (each client's update norm before DP clipping).
    """
    if dp_clip is not None:
        if not dp_clip > 0:
            raise ValueError(f"dp_clip must be > 0 or None, got {dp_clip!r}")
        if expected_clients is None or not expected_clients > 0:
            raise ValueError("DP-FedAvg needs expected_clients > 0 (sampling rate x clients)")
    if not dp_noise >= 0:
        raise ValueError(f"dp_noise must be >= 0, got {dp_noise!r}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm!r}")
    client = make_client_update(learner, local_lr=local_lr, compute_dtype=compute_dtype)

    def round_fn(
        params, opt_state, tasks, weights, participating, steps_done, key=None, noise_key=None
    ):
        weights = jnp.asarray(weights, jnp.float32)
        n_c, n_s, n_b = weights.shape
        part = jnp.asarray(participating, jnp.float32) > 0
        steps = jnp.asarray(steps_done, jnp.int32)
        keys = None
        if key is not None:
            keys = jax.random.split(key, n_c * n_s * n_b)
            keys = keys.reshape((n_c, n_s, n_b) + keys.shape[1:])
        # a client that does not respond runs no step at all
        steps = jnp.where(part, steps, 0)
        if keys is None:
            deltas, ns, losses = jax.vmap(lambda t, w, s: client(params, t, w, s))(
                tasks, weights, steps
            )
        else:
            deltas, ns, losses = jax.vmap(lambda t, w, s, k: client(params, t, w, s, k))(
                tasks, weights, steps, keys
            )
        responding = part & (ns > 0)
        ns = jnp.where(responding, ns, 0.0)
        # a non-responding slot contributes exactly zero, even if its values were NaN
        deltas = jax.tree_util.tree_map(
            lambda d: jnp.where(responding.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0.0), deltas
        )
        norms = jax.vmap(optax.tree.norm)(deltas)
        loss_sum = jnp.sum(jnp.where(responding, losses, 0.0))
        if dp_clip is None:
            total = jnp.sum(ns)
            grad_sum = jax.tree_util.tree_map(lambda d: -jnp.tensordot(ns, d, axes=(0, 0)), deltas)
        else:
            clipped_sum = dp_sum(deltas, responding, dp_clip)
            if dp_noise > 0:
                leaves, tdef = jax.tree_util.tree_flatten(clipped_sum)
                nkeys = jax.random.split(noise_key, len(leaves))
                leaves = [
                    a + dp_noise * dp_clip * jax.random.normal(k, a.shape, a.dtype)
                    for a, k in zip(leaves, nkeys)
                ]
                clipped_sum = jax.tree_util.tree_unflatten(tdef, leaves)
            total = jnp.float32(expected_clients)
            grad_sum = jax.tree_util.tree_map(lambda d: -d, clipped_sum)
            # the loss metric stays the per-task mean (finish_meta_step divides by `total`)
            loss_sum = loss_sum * total / jnp.maximum(jnp.sum(ns), 1.0)
        new_params, new_opt, m = finish_meta_step(
            params, opt_state, loss_sum, grad_sum, total, server_optimizer, clip_norm
        )
        m = m | {
            "clients": jnp.sum(responding.astype(jnp.int32)),
            "tasks": jnp.sum(ns),
            "delta_norm": norms,
        }
        return new_params, new_opt, m

    return jax.jit(round_fn) if jit else round_fn


def dp_sum(deltas: PyTree, participating, dp_clip: float) -> PyTree:
    """The DP-FedAvg clipped sum ``Σ_c clip(Δ_c, dp_clip)`` over participating clients (no
    noise): the quantity whose sensitivity to one client is at most ``dp_clip``."""
    part = jnp.asarray(participating, jnp.float32) > 0
    norms = jax.vmap(optax.tree.norm)(deltas)
    scale = jnp.where(part, jnp.minimum(1.0, dp_clip / jnp.maximum(norms, 1e-12)), 0.0)
    return jax.tree_util.tree_map(lambda d: jnp.tensordot(scale, d, axes=(0, 0)), deltas)
