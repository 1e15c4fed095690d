"""The same meta-step in three executions over the tasks of a meta-batch:

* ``vmap``: the library step, :func:`metarec.meta.step.make_meta_step` (``vmap(task_grad)`` over
  the task axis, one ``jax.jit``);
* ``map``: the same meta-step with ``jax.lax.map`` over tasks instead of ``vmap`` (one jitted
  program, tasks processed one after another inside XLA);
* ``sparse``: the library step with row-gathered embedding tables
  (``make_meta_step(..., sparse_tables=...)``: no dense per-task gradient of MeLU's tables);
* ``loop``: what typical research code does: a Python loop over the tasks, each task's adapt +
  query loss + meta-gradient jitted separately, the gradients pulled to the host and summed there,
  then one jitted optimizer update.

All three compute the same meta-gradient and apply the same update (clip, finite guard, optax),
which the tests check with :func:`grad_capture` (an "optimizer" whose state *is* the
meta-gradient).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metarec.data.tasks import Task, index_tasks
from metarec.meta import step as mstep

MODES = ("vmap", "map", "loop", "sparse")


def grad_capture() -> optax.GradientTransformation:
    """An "optimizer" whose state after ``update`` is the (averaged, clipped) meta-gradient it was
    given and whose updates are zero: run any meta-step with it and read the meta-gradient from the
    returned optimizer state."""

    def init(params):
        return jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)

    def update(updates, state, params=None):
        del state, params
        return jax.tree_util.tree_map(jnp.zeros_like, updates), updates

    return optax.GradientTransformation(init, update)


def make_map_step(
    learner, optimizer, *, clip_norm=None, compute_dtype=None, jit: bool = True
) -> Callable:
    """The meta-step with ``jax.lax.map`` over tasks (sequential inside one XLA program) instead of
    ``vmap``; same signature and result as :func:`metarec.meta.step.make_meta_step`."""
    one = mstep.weighted_task_grad(learner, compute_dtype)

    def step(meta_params, opt_state, tasks, task_weights, key=None):
        n = jax.tree_util.tree_leaves(tasks)[0].shape[0]
        weights = jnp.asarray(task_weights, jnp.float32)
        keys = None if key is None else jax.random.split(key, n)

        def body(xs):
            t, w, k = xs
            return one(meta_params, t, w, k)

        losses, grads = jax.lax.map(body, (tasks, weights, keys))
        grad_sum = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), grads)
        loss_sum, total_w = jnp.sum(losses), jnp.sum(weights)
        return mstep.finish_meta_step(
            meta_params, opt_state, loss_sum, grad_sum, total_w, optimizer, clip_norm
        )

    return jax.jit(step) if jit else step


class LoopStep:
    """The per-task Python-loop baseline ("typical research code").

    ``prepare(host_batch)`` splits a batched host ``Task`` into per-task device pytrees (done by the
    input pipeline, off the timed path, so the baseline is not charged for it). Calling the object
    with ``(meta_params, opt_state, per_task_list, weights, key)`` runs, for every task, the jitted
    ``adapt + query loss + meta-gradient`` of that one task, pulls its gradient to the host and sums
    there (numpy, float32), then applies ``finish_meta_step`` (jitted). Per-task keys are
    ``jax.random.split(key, T)[t]`` exactly like the library step, so results match it.
    """

    def __init__(self, learner, optimizer, *, clip_norm=None, compute_dtype=None):
        self.task_fn = jax.jit(mstep.weighted_task_grad(learner, compute_dtype))

        def finish(meta_params, opt_state, loss_sum, grad_sum, total_w):
            return mstep.finish_meta_step(
                meta_params, opt_state, loss_sum, grad_sum, total_w, optimizer, clip_norm
            )

        self.finish = jax.jit(finish)
        self.split = jax.jit(jax.random.split, static_argnums=1)
        self.task_call = self.task_fn  # may be replaced by a pre-compiled executable (see measure)

    @staticmethod
    def prepare(host_batch: Task) -> list[Task]:
        n = host_batch.num_tasks
        return [jax.device_put(index_tasks(host_batch, t)) for t in range(n)]

    def __call__(self, meta_params, opt_state, per_task: list, weights, key=None):
        weights = np.asarray(weights, np.float32)
        keys = [None] * len(per_task) if key is None else list(self.split(key, len(per_task)))
        loss_sum, grad_sum = 0.0, None
        for t, task in enumerate(per_task):
            loss, g = jax.device_get(self.task_call(meta_params, task, weights[t], keys[t]))
            loss_sum += float(loss)
            grad_sum = g if grad_sum is None else jax.tree_util.tree_map(np.add, grad_sum, g)
        total_w = np.float32(weights.sum())
        return self.finish(meta_params, opt_state, np.float32(loss_sum), grad_sum, total_w)


def make_step(
    learner,
    optimizer,
    mode: str,
    *,
    chunk_size=None,
    clip_norm=None,
    compute_dtype=None,
    mesh=None,
    sparse_tables=None,
):
    """The meta-step in execution ``mode`` (``vmap`` = :func:`metarec.meta.step.make_meta_step`,
    ``sparse`` = the same with ``sparse_tables``, ``map`` = :func:`make_map_step`, ``loop`` =
    :class:`LoopStep`). ``chunk_size``/``mesh`` apply to vmap and sparse."""
    if mode in ("vmap", "sparse"):
        if mode == "sparse" and not sparse_tables:
            raise ValueError("mode 'sparse' needs sparse_tables (the model's lookup tables)")
        return mstep.make_meta_step(
            learner,
            optimizer,
            chunk_size=chunk_size,
            clip_norm=clip_norm,
            compute_dtype=compute_dtype,
            mesh=mesh,
            sparse_tables=sparse_tables if mode == "sparse" else None,
        )
    if mode == "map":
        return make_map_step(learner, optimizer, clip_norm=clip_norm, compute_dtype=compute_dtype)
    if mode == "loop":
        return LoopStep(learner, optimizer, clip_norm=clip_norm, compute_dtype=compute_dtype)
    raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
