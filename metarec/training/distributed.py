"""Multi-process data parallelism on JAX's own distributed runtime (no parameter server, no RPC).

Every process runs the same program: :func:`initialize` joins the processes (``jax.distributed``;
on CPU with gloo collectives over TCP), after which ``jax.devices()`` spans every process and the
mesh of :func:`metarec.meta.step.make_mesh` is global. Each process then holds only its own rows of
a meta-batch (:func:`process_rows`) and hands them to :func:`global_batch`, which assembles one
global array sharded over the task axis (``jax.make_array_from_process_local_data``) without any
process seeing the others' rows. The existing jitted meta-step (``make_meta_step(..., mesh=mesh)``)
then sums the per-task gradients across processes inside XLA (an all-reduce) and every process
ends with the same replicated parameters.

Arguments come in explicitly (a launcher reads flags or a scheduler's environment; this module
never does).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metarec.meta.step import TASK_AXIS

PyTree = Any


def initialize(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    cpu_collectives: str = "gloo",
    local_device_ids=None,
    timeout_s: int = 300,
) -> None:
    """Join this process to a ``num_processes``-process JAX job coordinated at
    ``coordinator_address`` (``host:port`` of process 0). Call before anything touches a JAX
    backend. All three ``None``: JAX detects them itself (SLURM, Open MPI, TPU pods).

    ``cpu_collectives`` picks the cross-process collectives of the CPU backend (``"gloo"``, TCP;
    ``"mpi"`` needs an MPI library): without them a CPU computation spanning processes fails.
    GPUs use NCCL and TPUs their interconnect whatever this says.
    """
    given = [a is not None for a in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "distributed.initialize: give coordinator_address, num_processes and process_id "
            "together, or none of them (JAX then detects SLURM / Open MPI / TPU pods)"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"distributed.initialize: process_id must be in [0, {num_processes}), got {process_id}"
        )
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=timeout_s,
    )


def process_rows(n_rows: int, mesh: Mesh, axis: str = TASK_AXIS) -> slice:
    """The rows of an ``[n_rows]`` global batch, split over ``axis`` of ``mesh``, that live on this
    process's devices: what this process must load and pass to :func:`global_batch`. Read off the
    sharding itself, so it always agrees with where ``make_array_from_process_local_data`` puts
    them."""
    size = mesh.shape[axis]
    if n_rows % size:
        raise ValueError(
            f"process_rows: a batch of {n_rows} rows does not split evenly over the {size} "
            f"devices of mesh axis {axis!r}; pad it (metarec.data.tasks.pad_tasks)"
        )
    index = NamedSharding(mesh, P(axis)).addressable_devices_indices_map((n_rows,))
    starts = sorted({(s[0].start or 0, s[0].stop or n_rows) for s in index.values()})
    lo, hi = starts[0][0], starts[-1][1]
    if sum(b - a for a, b in starts) != hi - lo:
        raise ValueError(
            f"process_rows: this process's devices hold rows {starts}, not one contiguous block; "
            "build the mesh with the devices of each process next to each other (make_mesh does)"
        )
    return slice(lo, hi)


def global_batch(local: PyTree, mesh: Mesh, axis: str = TASK_AXIS) -> PyTree:
    """One global array per leaf of ``local`` (this process's rows, :func:`process_rows`), sharded
    over ``axis`` of ``mesh``; with one process it equals ``device_put`` with that sharding."""
    sharding = NamedSharding(mesh, P(axis))
    n_proc = len({d.process_index for d in mesh.devices.flat})

    def one(a):
        a = np.asarray(a)
        return jax.make_array_from_process_local_data(
            sharding, a, (a.shape[0] * n_proc,) + a.shape[1:]
        )

    return jax.tree_util.tree_map(one, local)


def spans_processes(mesh: Mesh | None) -> bool:
    """Whether ``mesh`` holds devices of other processes (then arrays on it must be assembled with
    :func:`global_batch` / :func:`replicate`, not ``device_put``)."""
    if mesh is None:
        return False
    return any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def _is_key(a) -> bool:
    return isinstance(a, jax.Array) and jax.numpy.issubdtype(a.dtype, jax.dtypes.prng_key)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every leaf of ``tree`` (the same host values on every process: params, optimizer state, a
    PRNG key, raw ``uint32`` or typed) as a global array fully replicated on ``mesh``."""
    sharding = NamedSharding(mesh, P())

    def one(a):
        if _is_key(a):
            impl = jax.random.key_impl(a)
            return jax.random.wrap_key_data(one(jax.random.key_data(a)), impl=impl)
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    return jax.tree_util.tree_map(one, tree)


def to_host(tree: PyTree) -> PyTree:
    """Numpy copies of fully replicated global arrays (this process's copy; no communication). A
    typed PRNG key comes back as a typed key on this process's default device."""

    def one(a):
        if not isinstance(a, jax.Array):
            return np.asarray(a)
        if not a.is_fully_replicated:
            raise ValueError(
                f"to_host: an array of shape {a.shape} is sharded ({a.sharding}); "
                "only replicated results (params, metrics) can be read on one process"
            )
        if _is_key(a):
            data = np.asarray(jax.random.key_data(a.addressable_data(0)))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        return np.asarray(a.addressable_data(0))

    return jax.tree_util.tree_map(one, tree)
