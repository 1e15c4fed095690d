"""Checkpoints of a training run with orbax-checkpoint: params, optimizer state, PRNG key, step and
the data-sampler position, written atomically, keeping the last N and the best by a validation
metric.

A checkpoint holds two items:

* ``state`` — a pytree of arrays (``{"params", "opt_state", "key"}`` for the cold-start loop),
  saved packed: its leaves concatenated into one 1-D array per dtype
  (``orbax.checkpoint.args.StandardSave`` of ``{dtype name: array}``), because orbax's cost per
  saved array, not per byte, dominates at these sizes. It is restored into the structure of a
  template pytree (so NamedTuple optimizer states and Meta-SGD parameters come back as the same
  types);
* ``meta`` — a JSON dict of host-side counters: step, sampler position ``(epoch, batch)``, the
  losses of the current epoch so far, the training history, the early-stopping state and elapsed
  seconds, plus ``layout``: every leaf's path, dtype and shape, in order, which is how the packed
  arrays are split again and what a template is checked against. Python floats round-trip exactly
  through JSON, so a resumed run continues bit-identically.

Orbax writes every step into a temporary directory and renames it when complete (atomic on a local
file system); temporary directories left by a killed process are removed when the directory is
opened again (``cleanup_tmp_directories``). Retention: the ``keep_last`` newest checkpoints plus the
``keep_best`` best ones among those saved with a metric (lower is better; ties go to the earlier
step).

The sampler is resumable because its order is a pure function of ``(sampler_seed, epoch)``
(:func:`epoch_order`): the position ``(epoch, batch index)`` is all a checkpoint needs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from metarec.data.tasks import epoch_order  # the data layer owns it; the streaming loader uses it

PyTree = Any
log = logging.getLogger("metarec.training.checkpoint")


def tree_digest(tree: PyTree) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes: equal digests mean bit-identical
    trees."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(jax.device_get(_key_data(leaf)))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _key_data(x):
    """Typed PRNG keys (``jax.random.key``) as their raw uint32 data; anything else unchanged."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


def _is_typed_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _layout(tree: PyTree) -> list[list]:
    """One JSON-able ``[path, dtype, shape]`` per leaf of ``tree``, typed keys as their raw data
    (from shapes and dtypes only: a template's buffers are never read)."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_typed_key(x):
            x = jax.eval_shape(jax.random.key_data, x)
        elif not hasattr(x, "dtype"):  # a Python scalar
            x = np.asarray(x)
        out.append([jax.tree_util.keystr(path), str(np.dtype(x.dtype)), list(x.shape)])
    return out


def _host_leaves(tree: PyTree) -> list[np.ndarray]:
    """``tree``'s leaves as host arrays (one transfer), typed keys as their raw data."""
    leaves = jax.device_get([_key_data(x) for x in jax.tree_util.tree_leaves(tree)])
    return [np.asarray(a) for a in leaves]


def _pack(leaves: list[np.ndarray]) -> dict[str, np.ndarray]:
    """One 1-D array per dtype: the leaves of that dtype raveled and concatenated in order."""
    groups: dict[str, list[np.ndarray]] = {}
    for a in leaves:
        groups.setdefault(str(a.dtype), []).append(a.ravel())
    return {d: np.concatenate(g) for d, g in groups.items()}


def _packed_like(layout: list[list]) -> dict[str, np.ndarray]:
    """Zero arrays of the packed shapes of ``layout``: the restore template."""
    sizes: dict[str, int] = {}
    for _, dtype, shape in layout:
        sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
    return {d: np.zeros(n, np.dtype(d)) for d, n in sizes.items()}


def _unpack(packed: dict[str, np.ndarray], layout: list[list]) -> list[np.ndarray]:
    """The leaves of ``layout`` cut back out of the packed arrays."""
    at = dict.fromkeys(packed, 0)
    out = []
    for _, dtype, shape in layout:
        n = math.prod(shape)
        out.append(packed[dtype][at[dtype] : at[dtype] + n].reshape(shape))
        at[dtype] += n
    return out


def _like_leaf(restored: np.ndarray, t):
    """A restored leaf as the kind of its template leaf: a typed key, a device array placed as
    the template is, or a host array."""
    if _is_typed_key(t):
        return jax.random.wrap_key_data(
            jax.device_put(restored, t.sharding), impl=jax.random.key_impl(t)
        )
    if isinstance(t, jax.Array):
        return jax.device_put(restored, t.sharding)
    return restored


def _check_layout(saved: list[list], like: PyTree, what: str) -> None:
    """``ValueError`` starting with ``what`` and naming the first difference unless ``like`` has
    the ``saved`` layout."""
    expected = _layout(like)
    if saved == expected:
        return
    detail = f"{len(saved)} arrays saved, {len(expected)} expected"
    for a, b in zip(saved, expected, strict=False):
        if a != b:
            detail = f"saved {a[0]} {a[1]}{tuple(a[2])}, expected {b[0]} {b[1]}{tuple(b[2])}"
            break
    raise ValueError(f"{what}: {detail}")


def _metric_key(metrics: dict):
    """Sort key of a checkpoint for the BestN policy: higher is better. Lower metric wins, NaN is
    worst, ties go to the earlier step."""
    v = float(metrics["value"])
    if not math.isfinite(v):
        v = math.inf
    return (-v, -int(metrics["step"]))


class Checkpointer:
    """Checkpoints of one training unit in ``directory`` (an orbax ``CheckpointManager``).

    Args:
      directory: created if missing; one sub-directory per saved step.
      keep_last: how many of the newest checkpoints to keep (>= 1).
      keep_best: how many of the best checkpoints by metric to keep besides (>= 0).

    Use as a context manager or call :meth:`close`. Saving is synchronous: when :meth:`save`
    returns, the checkpoint is complete on disk.
    """

    def __init__(self, directory: str, keep_last: int = 2, keep_best: int = 1):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, got {keep_best}")
        self.directory = os.path.abspath(directory)
        policies = [ocm.LatestN(n=keep_last)]
        if keep_best:
            policies.append(
                ocm.BestN(
                    get_metric_fn=_metric_key, n=keep_best, keep_checkpoints_without_metrics=False
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    # ------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        """Steps of the checkpoints currently on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The retained checkpoint with the lowest metric (earliest on ties), or None if none has
        one."""
        best = None
        for s in self.all_steps():
            meta = self.restore_meta(s)
            if meta.get("metric") is None:
                continue
            k = _metric_key({"value": meta["metric"], "step": s})
            if best is None or k > best[0]:
                best = (k, s)
        return None if best is None else best[1]

    # ------------------------------------------------------------------ save / restore
    def save(self, step: int, state: PyTree, meta: dict, metric: float | None = None) -> None:
        """Write checkpoint ``step`` (arrays ``state``, JSON-able ``meta``); ``metric`` (lower is
        better, e.g. validation MAE) makes it a candidate for the best-checkpoint retention."""
        layout, leaves = _layout(state), _host_leaves(state)
        meta = dict(meta, step=int(step), metric=None if metric is None else float(metric))
        meta["layout"] = layout
        metrics = None if metric is None else {"value": float(metric), "step": int(step)}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_pack(leaves)), meta=ocp.args.JsonSave(meta)
            ),
            metrics=metrics,
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, like: PyTree) -> tuple[PyTree, dict]:
        """Restore checkpoint ``step`` into the structure, dtypes and shapes of ``like``; returns
        ``(state, meta)``."""
        meta = self._saved_meta(step)
        layout = meta.pop("layout")
        _check_layout(
            layout,
            like,
            f"{self.directory}/{step}: the checkpoint does not match the model being trained "
            "(different architecture or config?)",
        )
        leaves = _unpack(self._restore_packed(step, layout), layout)
        like_leaves, treedef = jax.tree_util.tree_flatten(like)
        state = [_like_leaf(r, t) for r, t in zip(leaves, like_leaves, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, state), meta

    def restore_meta(self, step: int) -> dict:
        """Only the JSON part of checkpoint ``step`` (without its layout)."""
        meta = self._saved_meta(step)
        meta.pop("layout")
        return meta

    def _saved_meta(self, step: int) -> dict:
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"{self.directory}: no checkpoint for step {step}; available: {self.all_steps()}"
            )
        out = self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = dict(out.meta)
        if "layout" not in meta:
            raise ValueError(
                f"{self.directory}/{step}: written by an older metarec (one saved array per "
                "leaf), which this version does not read; finish that run with the version that "
                "started it, or start again with --overwrite"
            )
        return meta

    def _restore_packed(self, step: int, layout: list[list]) -> dict[str, np.ndarray]:
        out = self._manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(_packed_like(layout))),
        )
        return {d: np.asarray(a) for d, a in out.state.items()}

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def restore_latest_params(directory: str, like: PyTree, which: str = "best") -> PyTree:
    """Convenience for research code: the ``params`` of the best (``which="best"``) or newest
    (``"latest"``) checkpoint in ``directory``; ``like`` is a params pytree of the right
    structure."""
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    with Checkpointer(directory) as ck:
        step = ck.best_step() if which == "best" else ck.latest_step()
        if step is None:
            step = ck.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint found")
        layout = ck._saved_meta(step)["layout"]
        leaves = _unpack(ck._restore_packed(step, layout), layout)
    # only the params of the saved {"params", "opt_state", "key"} tree are returned
    prefix = "['params']"
    params = [
        ([p[len(prefix) :], d, s], a)
        for (p, d, s), a in zip(layout, leaves, strict=True)
        if p.startswith(prefix)
    ]
    _check_layout(
        [entry for entry, _ in params],
        like,
        f"{directory}/{step}: the checkpoint's params do not match ``like``",
    )
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(like), [jnp.asarray(a) for _, a in params]
    )


__all__ = ["Checkpointer", "epoch_order", "restore_latest_params", "tree_digest"]
