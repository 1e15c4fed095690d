"""Row-gathered lookup tables for the meta-step (``make_meta_step(..., sparse_tables=...)``).

Why: an embedding table that the inner loop does not adapt (MeLU's item-id table under the
``"decision"`` mode) is still a meta-parameter, and ``vmap(task_grad)`` differentiates each task
w.r.t. the *whole* table: a dense ``[tasks, vocab, dim]`` gradient (410 MB per meta-batch of 32 at
100k items) that is written, then summed. A task only ever reads ``1 + S + Q`` rows of it (its
support and query examples, plus the OOV row 0 that feature dropout and unknown ids select).

So, once per meta-batch and outside the per-task ``vmap``:

1. :func:`gather_rows` gathers each task's rows ``[T, R, dim]`` (``R = 1 + S + Q``; row 0 is the
   table's OOV row, then one row per example, duplicates kept) and rewrites the index columns of
   the task's inputs to positions in that small table;
2. the per-task gradient is taken w.r.t. the ``[R, dim]`` rows (the model runs on an ``R``-row
   table: it must read table sizes from the parameters, as :func:`metarec.models.melu.make_melu`
   does);
3. :func:`sum_task_grads` adds every task's row gradients into the table with one ``segment_sum``.

This is exact for every learner (second-order MAML included) as long as the inner loop leaves the
table unchanged, because the rows are then plain inputs of each task's computation and the chain
rule through the gather is the scatter-add. A table the inner loop adapts would be adapted per
duplicate row instead of per id, so :func:`check_not_adapted` refuses it (:class:`TablesRefused`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metarec.meta.inner import path_to_str

PyTree = Any


class TablesRefused(ValueError):
    """Raised (at trace time) when tables cannot be row-gathered exactly: a table the inner loop
    adapts, a model that cannot run on gathered rows, a path that matches no ``[vocab, dim]``
    parameter. A ``ValueError``, so callers may also catch that."""


class LookupTable(NamedTuple):
    """A ``[vocab, dim]`` parameter leaf that the model reads only as ``table[ids]`` with
    ``ids = x[field][..., column]`` (``column=None``: ``x[field]`` itself), an index outside
    ``[0, vocab)`` selecting row 0. ``path`` is the leaf's path in the model parameters
    (:func:`metarec.meta.inner.path_to_str`, e.g. ``"item_emb_1/embedding"``); in meta-parameters
    that wrap the model's (Meta-SGD's ``params``/``lr``) every leaf whose path ends with it is
    gathered the same way."""

    path: str
    field: str
    column: int | None
    vocab: int


def _matches(leaf_path: str, table_path: str) -> bool:
    return leaf_path == table_path or leaf_path.endswith("/" + table_path)


def table_leaves(meta_params: PyTree, tables) -> list[int | None]:
    """For each leaf of ``meta_params`` (``tree_leaves`` order): the index in ``tables`` of the
    table it is, or None. Raises one clear ``ValueError`` when a table matches no leaf or a
    matching leaf is not ``[vocab, dim]``."""
    paths = [path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(meta_params)]
    leaves = jax.tree_util.tree_leaves(meta_params)
    out: list[int | None] = [None] * len(leaves)
    for k, t in enumerate(tables):
        hits = [i for i, p in enumerate(paths) if _matches(p, t.path)]
        if not hits:
            raise TablesRefused(
                f"sparse_tables: no meta-parameter at path {t.path!r} (leaves: {', '.join(paths)})"
            )
        for i in hits:
            if out[i] is not None:
                raise TablesRefused(f"sparse_tables: leaf {paths[i]!r} matches two tables")
            if jnp.ndim(leaves[i]) != 2 or jnp.shape(leaves[i])[0] != t.vocab:
                raise TablesRefused(
                    f"sparse_tables: leaf {paths[i]!r} has shape {jnp.shape(leaves[i])}, "
                    f"expected [{t.vocab}, dim] for table {t.path!r}"
                )
            out[i] = k
    return out


def _ids(x: dict, t: LookupTable) -> jax.Array:
    a = x[t.field]
    return a if t.column is None else a[..., t.column]


def _set_ids(x: dict, t: LookupTable, local: jax.Array) -> dict:
    a = jnp.asarray(x[t.field])
    local = local.astype(a.dtype)
    new = local if t.column is None else a.at[..., t.column].set(local)
    return {**x, t.field: new}


def row_indices(tasks, tables) -> list[jax.Array]:
    """Per table, the ``[T, R]`` table rows each task reads: row 0 (OOV), then its support and its
    query examples' rows in order (an index outside ``[0, vocab)`` -> 0, as the model maps it)."""
    out = []
    for t in tables:
        cols = [jnp.zeros((tasks.user.shape[0], 1), jnp.int32)]
        for ex in (tasks.support, tasks.query):
            ids = _ids(ex.x, t).astype(jnp.int32)
            ids = jnp.where((ids >= 0) & (ids < t.vocab), ids, 0)
            cols.append(ids.reshape(ids.shape[0], -1))
        out.append(jnp.concatenate(cols, axis=1))
    return out


def localize_tasks(tasks, tables):
    """The tasks with every table's index column rewritten to positions in the task's gathered
    rows (support example ``i`` -> ``1 + i``, query example ``j`` -> ``1 + S + j``)."""
    sx, qx = tasks.support.x, tasks.query.x
    for t in tables:
        s_shape, q_shape = _ids(sx, t).shape, _ids(qx, t).shape
        n_s, n_q = math.prod(s_shape[1:]), math.prod(q_shape[1:])
        s_local = jnp.broadcast_to(1 + jnp.arange(n_s).reshape(s_shape[1:]), s_shape)
        q_local = jnp.broadcast_to(1 + n_s + jnp.arange(n_q).reshape(q_shape[1:]), q_shape)
        sx, qx = _set_ids(sx, t, s_local), _set_ids(qx, t, q_local)
    return tasks.replace(support=tasks.support.replace(x=sx), query=tasks.query.replace(x=qx))


def gather_rows(meta_params: PyTree, which: list, rows: list[jax.Array]):
    """``(local_params, in_axes)``: ``meta_params`` with every table leaf replaced by its
    ``[T, R, dim]`` gathered rows, and the matching ``vmap`` ``in_axes`` (0 there, None
    elsewhere)."""
    leaves, treedef = jax.tree_util.tree_flatten(meta_params)
    local = [
        leaf if k is None else jnp.take(leaf, rows[k], axis=0) for leaf, k in zip(leaves, which)
    ]
    axes = [None if k is None else 0 for k in which]
    return treedef.unflatten(local), treedef.unflatten(axes)


def sum_task_grads(grads: PyTree, meta_params: PyTree, which: list, rows: list[jax.Array]):
    """Sum per-task gradients (leading axis T) over the tasks: a table leaf's ``[T, R, dim]`` row
    gradients become its ``[vocab, dim]`` gradient with one ``segment_sum`` over all tasks'
    rows; any other leaf is summed over axis 0."""
    g_leaves, treedef = jax.tree_util.tree_flatten(grads)
    p_leaves = jax.tree_util.tree_leaves(meta_params)
    out = []
    for g, p, k in zip(g_leaves, p_leaves, which):
        if k is None:
            out.append(jnp.sum(g, axis=0))
        else:
            flat = g.reshape((-1, g.shape[-1]))
            out.append(jax.ops.segment_sum(flat, rows[k].reshape(-1), num_segments=p.shape[0]))
    return treedef.unflatten(out)


def check_not_adapted(learner, meta_params: PyTree, which: list, rows: list, tasks, tables):
    """Refuse (``ValueError``) when the inner loop changes a table: traces ``learner.adapt`` on the
    first task's gathered rows (localized ``tasks``) and checks that every table leaf of the
    adapted parameters is the input leaf itself (no operation applied). Trace-time only: nothing
    of it is in the compiled step."""
    local, axes = gather_rows(meta_params, which, [r[:1] for r in rows])
    one_params = jax.tree_util.tree_map(lambda a, ax: a if ax is None else a[0], local, axes)
    one_task = jax.tree_util.tree_map(lambda a: a[0], tasks)
    theta = learner.model_params(one_params)
    theta_paths = [path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(theta)]
    theta_leaves = jax.tree_util.tree_leaves(theta)
    idx = [i for i, p in enumerate(theta_paths) if any(p == t.path for t in tables)]

    def probe(table_rows):
        full = list(theta_leaves)
        for i, r in zip(idx, table_rows):
            full[i] = r
        mp = _with_model_leaves(learner, one_params, theta, full)
        phi = jax.tree_util.tree_leaves(learner.adapt(mp, one_task.support))
        return [phi[i] for i in idx]

    try:
        closed = jax.make_jaxpr(probe)([theta_leaves[i] for i in idx])
    except Exception as e:  # the model could not run on an R-row table
        raise TablesRefused(
            "sparse_tables: the model's apply_fn does not run on a row-gathered table (it must "
            f"read table sizes from the parameters, as metarec.models.melu does): {e}"
        ) from e
    jaxpr = closed.jaxpr
    for i, out_var, in_var in zip(idx, jaxpr.outvars, jaxpr.invars):
        if _source(jaxpr, out_var) is not in_var:
            raise TablesRefused(
                f"sparse_tables: table {theta_paths[i]!r} is adapted by the inner loop; only "
                "tables the inner loop leaves unchanged can be row-gathered (use an adapt mask "
                "that freezes it, e.g. MeLU's 'decision', or sparse_tables=None)"
            )


#: primitives that pass a value through unchanged (iMAML's inner loop starts from
#: ``stop_gradient(params)``)
_VALUE_PRESERVING = ("stop_gradient", "copy", "copy_p")


def _source(jaxpr, var):
    """The variable ``var`` is a copy of: walks back through value-preserving equations."""
    producers = {id(v): e for e in jaxpr.eqns for v in e.outvars}
    while id(var) in producers:
        e = producers[id(var)]
        same_type = e.primitive.name == "convert_element_type" and (
            e.params.get("new_dtype") == e.invars[0].aval.dtype
        )
        if len(e.invars) != 1 or not (e.primitive.name in _VALUE_PRESERVING or same_type):
            break
        var = e.invars[0]
    return var


def _with_model_leaves(learner, meta_params, theta, leaves):
    """``meta_params`` with its model parameters (``learner.model_params``) replaced by
    ``leaves``; the model parameters are either the meta-parameters themselves or one field of a
    NamedTuple (Meta-SGD's ``params``)."""
    new_theta = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(theta), leaves)
    if learner.model_params(meta_params) is meta_params:
        return new_theta
    if hasattr(meta_params, "_fields"):
        for f in meta_params._fields:
            if getattr(meta_params, f) is theta:
                return meta_params._replace(**{f: new_theta})
    raise TablesRefused(
        "sparse_tables: cannot locate the model parameters inside this learner's meta-parameters"
    )
