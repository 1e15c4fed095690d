"""Generic jitted meta-training and evaluation steps for any :class:`metarec.meta.MetaLearner`.

* :func:`make_meta_step` — one outer step on a meta-batch of tasks: ``vmap(task_grad)`` over the
  task axis (optionally in chunks scanned one after another, to bound memory), task-weighted mean,
  optional global-norm clipping, optax update, and a guard that keeps the old parameters when the
  loss or the gradient is not finite.
* :func:`make_eval_fn` — adapt every task on its support set (vmapped) and predict its query set,
  before and after adaptation.
* :func:`make_mesh`, :func:`shard_tasks`, :func:`replicate` — data parallelism over the task axis
  with ``jax.sharding`` (params replicated, tasks split across devices; with a mesh the step is a
  ``shard_map``: each device sums its own tasks' gradients, then one ``psum``).

Everything is a pure function of explicit state; nothing here reads flags or touches the host inside
a step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metarec.meta import tables as _tables
from metarec.meta.inner import mse

PyTree = Any
TASK_AXIS = "tasks"


# ----------------------------------------------------------------------------------------------
# dtype helpers
# ----------------------------------------------------------------------------------------------
def cast_floating(tree: PyTree, dtype) -> PyTree:
    """Cast every floating-point leaf of ``tree`` to ``dtype`` (integer/bool leaves untouched)."""
    if dtype is None:
        return tree

    def f(a):
        a = jnp.asarray(a)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree_util.tree_map(f, tree)


# ----------------------------------------------------------------------------------------------
# sharding helpers
# ----------------------------------------------------------------------------------------------
def make_mesh(n_devices: int | None = None, axis: str = TASK_AXIS) -> Mesh:
    """A 1-D device mesh over the first ``n_devices`` devices (all by default) named ``axis``."""
    devices = jax.devices()
    n = len(devices) if n_devices is None else n_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"make_mesh: n_devices must be in [1, {len(devices)}], got {n_devices}")
    return Mesh(np.array(devices[:n]), (axis,))


def shard_tasks(tasks: PyTree, mesh: Mesh, axis: str = TASK_AXIS) -> PyTree:
    """Place a pytree with a leading task axis (a batched ``Task``, or the ``[T]`` task weights) on
    ``mesh`` split along that axis. ``T`` must be divisible by the mesh size: pad first with
    :func:`metarec.data.tasks.pad_tasks` (weights 0 for the padding)."""
    n_dev = mesh.shape[axis]
    sizes = {np.shape(a)[0] for a in jax.tree_util.tree_leaves(tasks)}
    for t in sizes:
        if t % n_dev:
            raise ValueError(
                f"shard_tasks: task axis of size {t} is not divisible by the {n_dev} devices of "
                f"mesh axis {axis!r}; pad with metarec.data.tasks.pad_tasks(tasks, {n_dev})"
            )
    sharding = NamedSharding(mesh, P(axis))
    return jax.device_put(tasks, sharding)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place every leaf of ``tree`` (params, optimizer state) fully replicated on ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


# ----------------------------------------------------------------------------------------------
# the meta step
# ----------------------------------------------------------------------------------------------
def weighted_task_grad(learner, compute_dtype=None) -> Callable:
    """``f(meta_params, task, w, key) -> (w * loss, w * grad)`` in float32 for ONE task: the
    per-task work of every meta-step variant (vmapped here, ``lax.map``-ed or looped in the
    ``benchmarks.meta_step`` harness). Padded tasks (``w == 0``) contribute exactly nothing, even if
    their values were NaN."""

    def f(meta_params, task, w, key):
        mp = cast_floating(meta_params, compute_dtype)
        task = cast_floating(task, compute_dtype)
        loss, g = learner.task_grad(mp, task) if key is None else learner.task_grad(mp, task, key)
        w = jnp.asarray(w, jnp.float32)
        real = w > 0
        loss = jnp.where(real, loss.astype(jnp.float32), 0.0) * w
        g = jax.tree_util.tree_map(lambda x: jnp.where(real, x.astype(jnp.float32), 0.0) * w, g)
        return loss, g

    return f


def finish_meta_step(
    meta_params, opt_state, loss_sum, grad_sum, total_w, optimizer, clip_norm=None
):
    """Everything after the per-task sums: mean over the task weight, global-norm clip, finite guard
    (non-finite loss or gradient -> the old params and optimizer state, ``finite=False``), optax
    update. Returns ``(meta_params, opt_state, metrics)``."""
    denom = jnp.where(total_w > 0, total_w, 1.0)
    loss = loss_sum / denom
    grads = jax.tree_util.tree_map(
        lambda g, p: (g / denom).astype(jnp.result_type(p)), grad_sum, meta_params
    )
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if clip_norm is not None:
        scale = jnp.minimum(1.0, clip_norm / jnp.maximum(grad_norm, 1e-12))
        grads = jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), grads)
    # zero non-finite gradients before the optimizer so its state cannot be poisoned even
    # transiently; the `where` below restores the old state anyway.
    grads = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, meta_params)
    new_params = optax.apply_updates(meta_params, updates)

    def keep(new, old):
        return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)

    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "weight": total_w}
    return keep(new_params, meta_params), keep(new_opt_state, opt_state), metrics


def _weighted_task_sums(learner, meta_params, tasks, weights, keys, compute_dtype):
    """Sum over tasks of w_t * loss_t and w_t * grad_t (float32), vmapped over the task axis."""
    f = weighted_task_grad(learner, compute_dtype)

    def one(task, w, k):
        return f(meta_params, task, w, k)

    if keys is None:
        losses, grads = jax.vmap(lambda t, w: one(t, w, None))(tasks, weights)
    else:
        losses, grads = jax.vmap(one)(tasks, weights, keys)
    return jnp.sum(losses), jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), grads)


def _sparse_task_sums(learner, meta_params, which, rows, tasks, weights, keys, compute_dtype):
    """:func:`_weighted_task_sums` on row-gathered tables (:mod:`metarec.meta.tables`): each
    task's rows are gathered here, outside the ``vmap``; the per-task gradient of a table leaf is
    w.r.t. its ``[R, dim]`` rows, scattered into the table once for all tasks."""
    f = weighted_task_grad(learner, compute_dtype)
    local, axes = _tables.gather_rows(meta_params, which, rows)
    if keys is None:
        losses, grads = jax.vmap(lambda p, t, w: f(p, t, w, None), in_axes=(axes, 0, 0))(
            local, tasks, weights
        )
    else:
        losses, grads = jax.vmap(f, in_axes=(axes, 0, 0, 0))(local, tasks, weights, keys)
    return jnp.sum(losses), _tables.sum_task_grads(grads, meta_params, which, rows)


def make_meta_step(
    learner,
    optimizer: optax.GradientTransformation,
    *,
    chunk_size: int | None = None,
    clip_norm: float | None = None,
    compute_dtype=None,
    mesh: Mesh | None = None,
    axis: str = TASK_AXIS,
    jit: bool = True,
    sparse_tables=None,
) -> Callable:
    """Build ``step(meta_params, opt_state, tasks, task_weights, key=None) ->
    (meta_params, opt_state, metrics)``.

    Args:
      learner: a :class:`metarec.meta.MetaLearner`.
      optimizer: the outer optax optimizer (``opt_state = optimizer.init(meta_params)``).
      chunk_size: if set, ``task_grad`` is vmapped over chunks of this many tasks and the chunks are
        processed sequentially by ``lax.scan`` with a running float32 sum — same result (up to float
        summation order), peak memory of one chunk. ``T`` must be divisible by it. Chunk ``j`` holds
        tasks ``j, j + T/c, j + 2T/c, ...``. With a mesh of ``D`` devices, each device runs chunks
        of ``c / D`` of its own tasks (``c`` must be a multiple of ``D``). On CPU it is also faster:
        chunks of 8 tasks keep the temporaries in cache (measured in BUILD_NOTES.md,
        "Performance").
      clip_norm: clip the averaged meta-gradient to this global norm before the optimizer.
      compute_dtype: e.g. ``jnp.bfloat16``: the per-task computation (inner loop, query loss,
        meta-gradient) runs in this dtype; meta-parameters, gradient accumulation and the optimizer
        stay float32.
      mesh: optional device mesh: the task axis (tasks, weights, per-task keys) is split along
        ``axis`` and the parameters replicated (see :func:`shard_tasks`); each device sums its
        own tasks in a ``shard_map``, then one ``psum``. Every task gets the same key as without a
        mesh; results equal the single-device ones up to float summation order.
      jit: wrap the step in ``jax.jit`` (default).
      sparse_tables: optional sequence of :class:`metarec.meta.tables.LookupTable` (e.g.
        :func:`metarec.models.melu.lookup_tables`): embedding tables the inner loop does not adapt
        are differentiated w.r.t. the rows each task reads (gathered once per meta-batch) and their
        meta-gradient is one scatter-add over the batch, instead of a dense per-task
        ``[T, vocab, dim]`` gradient. Same meta-gradient up to float summation order; a table the
        inner loop adapts, or a model that cannot run on a gathered table, is refused with a
        ``ValueError``. None (default): the dense step, unchanged.

    ``tasks`` is a batched :class:`metarec.data.tasks.Task` (leading task axis T); ``task_weights``
    ``[T]`` (1.0 real task, 0.0 padding; any non-negative weights work). The meta-gradient is
    ``sum_t w_t g_t / sum_t w_t``. ``key`` (optional) is split into one key per task for stochastic
    models (feature dropout).

    ``metrics``: ``loss`` (weighted mean query loss after adaptation, the learner's meta loss),
    ``grad_norm`` (global norm of the averaged meta-gradient before clipping), ``finite`` (bool;
    when False the returned params and optimizer state are the *old* ones), ``weight`` (sum of
    weights).
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm!r}")

    n_devices = 1 if mesh is None else int(mesh.shape[axis])
    if chunk_size is not None and chunk_size % n_devices:
        raise ValueError(
            f"chunk_size={chunk_size} must be a multiple of the {n_devices} devices along mesh "
            f"axis {axis!r} (each device runs chunk_size / {n_devices} tasks of every chunk)"
        )

    def chunked_sums(meta_params, tasks, weights, keys, rows, chunk, which):
        """Sums over the tasks given, vmapped in chunks of ``chunk`` scanned one after another."""
        if which is not None:

            def sums(t, w, k, r):
                return _sparse_task_sums(learner, meta_params, which, r, t, w, k, compute_dtype)
        else:

            def sums(t, w, k, r):
                return _weighted_task_sums(learner, meta_params, t, w, k, compute_dtype)

        n = jax.tree_util.tree_leaves(tasks)[0].shape[0]
        if chunk is None or chunk >= n:
            return sums(tasks, weights, keys, rows)
        n_chunks = n // chunk

        def to_chunks(a):
            a = a.reshape((chunk, n_chunks) + a.shape[1:])
            return jnp.swapaxes(a, 0, 1)

        xs = (
            jax.tree_util.tree_map(to_chunks, tasks),
            to_chunks(weights),
            None if keys is None else to_chunks(keys),
            None if rows is None else [to_chunks(r) for r in rows],
        )
        zero = (
            jnp.zeros((), jnp.float32),
            jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), meta_params),
        )

        def body(carry, chunk_xs):
            l, g = sums(*chunk_xs)
            return (carry[0] + l, jax.tree_util.tree_map(jnp.add, carry[1], g)), None

        (loss_sum, grad_sum), _ = jax.lax.scan(body, zero, xs)
        return loss_sum, grad_sum

    def step(meta_params, opt_state, tasks, task_weights, key=None):
        n_tasks = jax.tree_util.tree_leaves(tasks)[0].shape[0]
        weights = jnp.asarray(task_weights, jnp.float32)
        if weights.shape != (n_tasks,):
            raise ValueError(f"task_weights must have shape [{n_tasks}], got {weights.shape}")
        if chunk_size is not None and chunk_size < n_tasks and n_tasks % chunk_size:
            raise ValueError(
                f"chunk_size={chunk_size} must divide the number of tasks in the meta-batch "
                f"({n_tasks}); pad the batch with metarec.data.tasks.pad_tasks"
            )
        keys = None if key is None else jax.random.split(key, n_tasks)
        which = rows = None
        if sparse_tables:
            which = _tables.table_leaves(meta_params, sparse_tables)
            rows = _tables.row_indices(tasks, sparse_tables)
            tasks = _tables.localize_tasks(tasks, sparse_tables)
            _tables.check_not_adapted(learner, meta_params, which, rows, tasks, sparse_tables)
        if mesh is None:
            loss_sum, grad_sum = chunked_sums(
                meta_params, tasks, weights, keys, rows, chunk_size, which
            )
        else:
            # each device sums its own slice of the tasks (in chunks of chunk_size / devices), then
            # one all-reduce; written as a shard_map, which XLA:CPU ran faster than the same step
            # partitioned from sharding constraints (BUILD_NOTES.md, issue 14)
            local_chunk = None if chunk_size is None else chunk_size // n_devices

            def per_device(mp, t, w, k, r):
                sums = chunked_sums(mp, t, w, k, r, local_chunk, which)
                return jax.lax.psum(sums, axis)

            part = P(axis)
            loss_sum, grad_sum = jax.shard_map(
                per_device,
                mesh=mesh,
                in_specs=(P(), part, part, part, part),
                out_specs=P(),
                check_vma=False,
            )(meta_params, tasks, weights, keys, rows)

        new_params, new_opt_state, metrics = finish_meta_step(
            meta_params, opt_state, loss_sum, grad_sum, jnp.sum(weights), optimizer, clip_norm
        )
        if mesh is not None:
            rep = NamedSharding(mesh, P())
            new_params = jax.lax.with_sharding_constraint(new_params, rep)
            new_opt_state = jax.lax.with_sharding_constraint(new_opt_state, rep)
        return new_params, new_opt_state, metrics

    return jax.jit(step) if jit else step


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
def make_eval_fn(
    learner,
    apply_fn: Callable,
    *,
    chunk_size: int | None = None,
    compute_dtype=None,
    jit: bool = True,
) -> Callable:
    """Build ``eval_fn(meta_params, tasks) -> dict`` that adapts every task on its support set and
    predicts its query set.

    Returned dict (float32, leading task axis T):
      ``pred`` ``[T, Q]`` query predictions after adaptation; ``pred_init`` ``[T, Q]`` before
      adaptation (the meta-learned initialisation); ``mse`` / ``mse_init`` ``[T]`` masked query MSE
      (0.0 for an all-padding task).

    ``chunk_size`` evaluates ``chunk_size`` tasks at a time (``lax.map`` with ``batch_size``), which
    bounds memory for large test sets; ``apply_fn`` is called deterministically (no dropout).
    """

    def per_task(meta_params, task):
        mp = cast_floating(meta_params, compute_dtype)
        task = cast_floating(task, compute_dtype)
        theta = learner.model_params(mp)
        phi = learner.adapt(mp, task.support)
        pred = apply_fn(phi, task.query.x).astype(jnp.float32)
        pred0 = apply_fn(theta, task.query.x).astype(jnp.float32)
        y = task.query.y.astype(jnp.float32)
        m = task.query.mask.astype(jnp.float32)
        return {
            "pred": pred,
            "pred_init": pred0,
            "mse": mse(pred, y, m),
            "mse_init": mse(pred0, y, m),
        }

    def eval_fn(meta_params, tasks):
        def f(t):
            return per_task(meta_params, t)

        if chunk_size is None:
            return jax.vmap(f)(tasks)
        return jax.lax.map(f, tasks, batch_size=chunk_size)

    return jax.jit(eval_fn) if jit else eval_fn
