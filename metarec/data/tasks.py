"""Fixed-shape task pytrees: every user is a task (support set -> adapt -> query set).

A :class:`Examples` holds one padded set of examples; a :class:`Task` a support and a query set.
Both are ``flax.struct`` dataclasses, i.e. pytrees, so a batch of tasks is simply a ``Task`` whose
leaves carry a leading task axis ``[T, ...]`` and ``jax.vmap`` over that axis gives one task at a
time. Padding is always explicit: ``mask`` is 1.0 for a real example and 0.0 for padding, and every
loss and metric in metarec is masked.

``x`` is any pytree of per-example inputs whose leaves share the leading example axis ``N`` (for
the MovieLens tasks: a dict of integer feature ids and multi-hot genres, see
:mod:`metarec.data.encode`).
The meta-learners never look inside ``x``; only the model's ``apply_fn`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Examples:
    """One padded set of examples: inputs ``x`` (pytree, leaves ``[..., N, ...]``), targets ``y``
    ``[..., N]`` and ``mask`` ``[..., N]`` (1.0 real, 0.0 padding)."""

    x: Any
    y: jax.Array
    mask: jax.Array

    @property
    def size(self) -> int:
        """Padded number of examples (static)."""
        return self.y.shape[-1]


@flax.struct.dataclass
class Task:
    """A support set and a query set of one user (or a batch of users with a leading axis).

    ``user`` holds the user's id (``-1`` for padding tasks) so that results can be traced back;
    it is never used by the learners.
    """

    support: Examples
    query: Examples
    user: jax.Array

    @property
    def num_tasks(self) -> int:
        """Number of tasks along the leading axis (only for batched tasks)."""
        return self.user.shape[0]


def index_tasks(tasks: Task, idx) -> Task:
    """Select tasks ``idx`` (int array or slice) along the leading task axis, on host or device."""
    return jax.tree_util.tree_map(lambda a: a[idx], tasks)


def stack_tasks(tasks: list[Task]) -> Task:
    """Stack single tasks (no task axis) into a batch with a leading task axis (host numpy)."""
    return jax.tree_util.tree_map(lambda *a: np.stack(a), *tasks)


def to_device(tasks: Task) -> Task:
    """Move every leaf to the default device as a jax array."""
    return jax.tree_util.tree_map(jnp.asarray, tasks)


def map_blocks(fn, arrays, block: int):
    """``fn(*blocks)`` over host ``arrays`` (a common leading axis) in blocks of ``block`` rows,
    the last padded with zeros (an empty input is one all-padding block), so every call has one
    shape and compiles once whatever the row count; ``fn`` must treat rows independently. The
    outputs (a pytree of arrays with the same leading axis) are fetched, joined on the host (no
    program per size) and trimmed to the real rows."""
    n = len(arrays[0])
    pad = -n % block if n else block
    padded = [np.pad(np.asarray(a), [(0, pad)] + [(0, 0)] * (np.ndim(a) - 1)) for a in arrays]
    outs = [
        jax.device_get(fn(*(a[i : i + block] for a in padded))) for i in range(0, n + pad, block)
    ]
    return jax.tree_util.tree_map(lambda *o: np.concatenate(o)[:n], *outs)


def pad_tasks(tasks: Task, multiple: int) -> tuple[Task, np.ndarray]:
    """Pad the task axis to a multiple of ``multiple`` with all-masked copies of task 0.

    Returns the padded tasks and a ``[T_padded]`` float weight vector (1.0 real task, 0.0 padding)
    so that averages over tasks can ignore the padding. Padding tasks have ``mask == 0`` everywhere
    and ``user == -1``.
    """
    n = tasks.num_tasks
    n_pad = (-n) % multiple
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(n_pad, np.float32)])
    if n_pad == 0:
        return tasks, weights
    filler = jax.tree_util.tree_map(lambda a: np.repeat(np.asarray(a[:1]), n_pad, axis=0), tasks)
    filler = filler.replace(
        support=filler.support.replace(mask=np.zeros_like(filler.support.mask)),
        query=filler.query.replace(mask=np.zeros_like(filler.query.mask)),
        user=np.full_like(filler.user, -1),
    )
    padded = jax.tree_util.tree_map(lambda a, b: np.concatenate([np.asarray(a), b]), tasks, filler)
    return padded, weights


def epoch_order(sampler_seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which the ``n`` training tasks are visited in ``epoch``: a permutation that
    depends only on ``(sampler_seed, epoch)``, so the sampler's position is just
    ``(epoch, batch index)``. Meta-training and the streaming loader (:mod:`metarec.data.stream`)
    share it, which is what makes their meta-batches identical."""
    if n < 0:
        raise ValueError(f"epoch_order: n must be >= 0, got {n}")
    return np.random.default_rng([int(sampler_seed), int(epoch)]).permutation(n)


def iterate_meta_batches(
    tasks: Task, meta_batch: int, rng: np.random.Generator, drop_remainder: bool = True
) -> Iterator[Task]:
    """Yield meta-batches of ``meta_batch`` tasks in a seeded random order (one epoch).

    With ``drop_remainder`` the last incomplete batch is dropped so every batch has the same static
    shape (one compilation). With ``drop_remainder=False`` it is padded with masked tasks instead.
    """
    n = tasks.num_tasks
    if meta_batch <= 0:
        raise ValueError(f"meta_batch must be positive, got {meta_batch}")
    order = rng.permutation(n)
    stop = (n // meta_batch) * meta_batch if drop_remainder else n
    if drop_remainder and stop == 0:
        raise ValueError(
            f"meta_batch={meta_batch} is larger than the number of training tasks ({n}); "
            "lower --meta_batch"
        )
    for start in range(0, stop, meta_batch):
        batch = index_tasks(tasks, order[start : start + meta_batch])
        if batch.num_tasks < meta_batch:
            batch, _ = pad_tasks(batch, meta_batch)
        yield batch


def check_finite_tasks(tasks: Task, name: str) -> None:
    """Raise ``ValueError`` if a floating-point input, target or mask of ``tasks`` is NaN or inf,
    naming the set (``name``), the field, the task index, the user id and how many values are bad.
    Run once before training: a NaN feature would otherwise surface much later as a non-finite
    loss."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tasks)[0]:
        a = np.asarray(leaf)
        if not np.issubdtype(a.dtype, np.floating):
            continue
        bad = ~np.isfinite(a)
        if bad.any():
            first = np.argwhere(bad)[0]
            per_task = a.ndim and a.shape[0] == tasks.user.shape[0]
            user = int(np.asarray(tasks.user)[first[0]]) if per_task else None
            field = jax.tree_util.keystr(path).lstrip(".")
            raise ValueError(
                f"{name}: {int(bad.sum())} non-finite value(s) (NaN/inf) in {field} "
                f"(first at index {tuple(int(i) for i in first)}, user {user}, "
                f"value {a[tuple(first)]}); "
                "inputs, targets and masks must be finite numbers"
            )


def pooled(tasks: Task) -> Task:
    """Support and query of every training task concatenated into the query set (empty support):
    conventional (non-meta) training on the same ratings."""

    def cat(a, b):
        return np.concatenate([np.asarray(a), np.asarray(b)], axis=1)

    q = jax.tree_util.tree_map(cat, tasks.support, tasks.query)
    empty = jax.tree_util.tree_map(lambda a: np.asarray(a)[:, :1], tasks.support)
    empty = empty.replace(mask=np.zeros_like(empty.mask))
    return Task(support=empty, query=q, user=tasks.user)


def pooled_tasks(train):
    """:func:`pooled` of fixed tasks, or of every draw of a per-epoch sampler."""
    if callable(train):
        return lambda epoch: pooled(train(epoch))
    return pooled(train)
