"""User-level differentially private meta-steps (DP-SGD with one task = one user).

:func:`make_dp_meta_step` is :func:`metarec.meta.step.make_meta_step` with the Gaussian mechanism
in the middle: every task's (user's) meta-gradient, the inner loop on the user's support set
included, is clipped to global L2 norm ``l2_clip``; the clipped gradients are summed over the
meta-batch (task weights are the 0/1 Poisson inclusion indicators of a fixed-capacity padded batch,
:mod:`metarec.data.poisson`); ``N(0, (noise_multiplier * l2_clip)^2)`` is added to every
coordinate of the sum; the noisy sum is divided by the *expected* batch size (the realised count
depends on who was sampled and is itself private). The accounting of such steps is
:mod:`metarec.meta.accounting`.

Everything after the noisy sum (mean, finite guard, optax update) is
:func:`metarec.meta.step.finish_meta_step`; the per-task work is
:func:`metarec.meta.step.weighted_task_grad`. With ``noise_multiplier=0``, ``l2_clip=inf`` and
``expected_batch_size=None`` the step is the non-private one, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from metarec.meta.step import finish_meta_step, weighted_task_grad

# folded into the step's key to get the noise key: the per-task keys stay those of make_meta_step
NOISE_STREAM = 0x0D9A


def _check(l2_clip, noise_multiplier, expected_batch_size, chunk_size) -> None:
    if not (isinstance(l2_clip, (int, float)) and l2_clip > 0):
        raise ValueError(f"l2_clip must be > 0 (inf: no clipping), got {l2_clip!r}")
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if noise_multiplier > 0 and math.isinf(l2_clip):
        raise ValueError("noise_multiplier > 0 needs a finite l2_clip (the noise std is sigma * C)")
    if expected_batch_size is not None and not expected_batch_size > 0:
        raise ValueError(f"expected_batch_size must be > 0 or None, got {expected_batch_size!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def clip_task_grad(loss, g, w, l2_clip: float):
    """``(loss, clipped g, was_clipped, was_dropped)`` for one task's weighted loss and gradient:
    ``g`` scaled to global norm at most ``l2_clip``. A real task whose loss or gradient is not
    finite contributes zeros to both (``was_dropped``): otherwise the step's finite guard would
    skip the update because of that one user, and whether it did would depend on their data."""
    norm = optax.tree.norm(g)
    ok = jnp.isfinite(norm) & jnp.isfinite(loss)
    scale = jnp.where(ok, jnp.minimum(1.0, l2_clip / jnp.maximum(norm, 1e-12)), 0.0)
    g = jax.tree_util.tree_map(lambda x: jnp.where(ok, x, 0.0) * scale.astype(x.dtype), g)
    real = w > 0
    return jnp.where(ok, loss, 0.0), g, real & ok & (norm > l2_clip), real & ~ok


def gaussian_noise(key, like, std):
    """``N(0, std^2)`` float32 noise with the structure of ``like`` (one key per leaf)."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(key, len(leaves))
    noise = [std * jax.random.normal(k, jnp.shape(x), jnp.float32) for k, x in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, noise)


def make_dp_meta_step(
    learner,
    optimizer: optax.GradientTransformation,
    *,
    l2_clip: float,
    noise_multiplier: float,
    expected_batch_size: float | None = None,
    chunk_size: int | None = None,
    compute_dtype=None,
    jit: bool = True,
) -> Callable:
    """Build ``step(meta_params, opt_state, tasks, task_weights, key) -> (meta_params, opt_state,
    metrics)``, the calling convention of :func:`metarec.meta.step.make_meta_step`.

    Args:
      learner: a :class:`metarec.meta.MetaLearner`.
      optimizer: the outer optax optimizer; it sees only the noisy mean gradient.
      l2_clip: per-task (per-user) global L2 bound ``C`` of the weighted meta-gradient
        (``math.inf``: no clipping, and non-finite per-task gradients are not dropped).
      noise_multiplier: ``sigma``; the noise added to the sum has std ``sigma * C`` per coordinate.
        ``sigma > 0`` needs a ``key`` (it is refused without one).
      expected_batch_size: the fixed denominator ``q * n_users`` of the private step. None: divide
        by the sum of the weights (not private; the equality check with the non-private step).
      chunk_size: as in ``make_meta_step``: tasks in chunks of this many, scanned one after another
        (chunk ``j`` holds tasks ``j, j + T/c, ...``); ``T`` must be divisible by it.
      compute_dtype: the per-task computation's dtype (sums and noise stay float32).
      jit: wrap the step in ``jax.jit``.

    ``key`` is split into one key per task exactly as ``make_meta_step`` splits it; the noise key
    is ``jax.random.fold_in(key, NOISE_STREAM)``.

    ``metrics``: ``loss`` (mean query loss over the sampled tasks), ``grad_norm`` (global norm of
    the noisy mean gradient), ``finite`` (False: old params and optimizer state returned),
    ``weight`` (sum of weights: the realised batch size), ``clipped`` (fraction of sampled tasks
    whose gradient was clipped), ``dropped`` (sampled tasks whose gradient was non-finite and
    contributed zeros). These metrics read the private batch: they are for monitoring, not release.
    """
    _check(l2_clip, noise_multiplier, expected_batch_size, chunk_size)
    clip, noisy, fixed = (
        not math.isinf(l2_clip),
        noise_multiplier > 0,
        expected_batch_size is not None,
    )
    flags = (chunk_size, compute_dtype, clip, noisy, fixed)
    # the bound, the noise std and the denominator are traced arguments: runs that differ only in
    # them (every epsilon, every seed) share one compilation
    memo_key = (id(learner), id(optimizer), *flags, jit)
    if memo_key not in _CORES:
        core = _make_core(learner, optimizer, *flags)
        _CORES[memo_key] = (learner, optimizer, jax.jit(core) if jit else core)
    core = _CORES[memo_key][2]
    hyper = (
        jnp.float32(l2_clip if clip else 0.0),
        jnp.float32(noise_multiplier * l2_clip if noisy else 0.0),
        jnp.float32(expected_batch_size if fixed else 0.0),
    )

    def step(meta_params, opt_state, tasks, task_weights, key=None):
        if noisy and key is None:
            raise ValueError(
                "make_dp_meta_step: noise_multiplier > 0 needs a PRNG key for the noise (got "
                "key=None)"
            )
        n_tasks = jax.tree_util.tree_leaves(tasks)[0].shape[0]
        if jnp.shape(task_weights) != (n_tasks,):
            raise ValueError(
                f"task_weights must have shape [{n_tasks}], got {jnp.shape(task_weights)}"
            )
        if chunk_size is not None and chunk_size < n_tasks and n_tasks % chunk_size:
            raise ValueError(
                f"chunk_size={chunk_size} must divide the number of tasks in the meta-batch "
                f"({n_tasks}); pad the batch with metarec.data.tasks.pad_tasks"
            )
        return core(meta_params, opt_state, tasks, task_weights, key, hyper)

    return step


# (learner, optimizer, jitted core) per (learner, optimizer, flags); the objects are kept so that
# their ids stay unique while memoised
_CORES: dict = {}


def _make_core(learner, optimizer, chunk_size, compute_dtype, clip, noisy, fixed) -> Callable:
    """The step body; ``hyper = (l2_clip, noise std, expected batch size)`` as float32 scalars
    (read only where ``clip`` / ``noisy`` / ``fixed`` say so)."""
    task_grad = weighted_task_grad(learner, compute_dtype)

    def sums(meta_params, tasks, weights, keys, l2_clip):
        def one(task, w, k):
            loss, g = task_grad(meta_params, task, w, k)
            if not clip:
                return loss, g, jnp.zeros((), bool), jnp.zeros((), bool)
            return clip_task_grad(loss, g, w, l2_clip)

        if keys is None:
            out = jax.vmap(lambda t, w: one(t, w, None))(tasks, weights)
        else:
            out = jax.vmap(one)(tasks, weights, keys)
        losses, grads, clipped, dropped = out
        return (
            jnp.sum(losses),
            jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), grads),
            jnp.sum(clipped.astype(jnp.float32)),
            jnp.sum(dropped.astype(jnp.float32)),
        )

    def core(meta_params, opt_state, tasks, task_weights, key, hyper):
        l2_clip, noise_std, expected = hyper
        n_tasks = jax.tree_util.tree_leaves(tasks)[0].shape[0]
        weights = jnp.asarray(task_weights, jnp.float32)
        keys = None if key is None else jax.random.split(key, n_tasks)
        if chunk_size is None or chunk_size >= n_tasks:
            loss_sum, grad_sum, n_clipped, n_dropped = sums(
                meta_params, tasks, weights, keys, l2_clip
            )
        else:
            n_chunks = n_tasks // chunk_size

            def to_chunks(a):
                return jnp.swapaxes(a.reshape((chunk_size, n_chunks) + a.shape[1:]), 0, 1)

            xs = (
                jax.tree_util.tree_map(to_chunks, tasks),
                to_chunks(weights),
                None if keys is None else to_chunks(keys),
            )
            zero = (
                jnp.zeros((), jnp.float32),
                jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), meta_params),
                jnp.zeros((), jnp.float32),
                jnp.zeros((), jnp.float32),
            )

            def body(carry, chunk):
                l, g, c, d = sums(meta_params, *chunk, l2_clip)
                g = jax.tree_util.tree_map(jnp.add, carry[1], g)
                return (carry[0] + l, g, carry[2] + c, carry[3] + d), None

            (loss_sum, grad_sum, n_clipped, n_dropped), _ = jax.lax.scan(body, zero, xs)

        if noisy:
            noise = gaussian_noise(jax.random.fold_in(key, NOISE_STREAM), grad_sum, noise_std)
            grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, noise)
        realised = jnp.sum(weights)
        denom = expected if fixed else realised
        new_params, new_opt_state, metrics = finish_meta_step(
            meta_params, opt_state, loss_sum, grad_sum, denom, optimizer, None
        )
        n = jnp.where(realised > 0, realised, 1.0)
        metrics = metrics | {
            "loss": loss_sum / n,
            "weight": realised,
            "clipped": n_clipped / n,
            "dropped": n_dropped,
        }
        return new_params, new_opt_state, metrics

    return core
