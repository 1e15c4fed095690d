"""The matmul ceiling of a step at its own shapes: every ``dot_general`` of the step's jaxpr (loop
trip counts applied, batch axes as ``vmap`` leaves them, forward and backward), each timed alone
at its shape and dtype, summed. The step cannot run faster than its matmuls alone at the speed
this machine gives at those shapes, so ``step FLOPs / that time`` bounds the step's FLOP rate;
its fraction of the big-square matmul peak (:func:`benchmarks.meta_step.machine.matmul_peak`) is
the honest ceiling for a "% of peak" target on this CPU.

A step sharded over several devices gets the same bound from its per-device program (the step
at its share of the tasks, :func:`per_device_args`), each dot timed on all devices at once, the
way the sharded step runs it (:func:`time_dot` with a ``mesh``).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.meta_step.flops import _sub_jaxprs


def _dot_key(eqn) -> tuple:
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    pref = eqn.params.get("preferred_element_type")
    return (
        tuple(lhs.shape),
        tuple(rhs.shape),
        str(lhs.dtype),
        str(rhs.dtype),
        eqn.params["dimension_numbers"],
        None if pref is None else str(np.dtype(pref)),
    )


def _walk(jaxpr, mult: float, counts: collections.Counter) -> None:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            counts[_dot_key(eqn)] += mult
            continue
        subs = _sub_jaxprs(eqn)
        if not subs:
            continue
        if eqn.primitive.name == "cond":  # one branch runs: count the one with most dots
            per = []
            for s in subs:
                c: collections.Counter = collections.Counter()
                _walk(s, mult, c)
                per.append(c)
            counts.update(max(per, key=lambda c: sum(_flops(k) * n for k, n in c.items())))
            continue
        m = float(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1.0
        for s in subs:
            _walk(s, mult * m, counts)


def _flops(key: tuple) -> float:
    lhs, rhs, _, _, ((lc, rc), (lb, rb)), _ = key
    batch = np.prod([lhs[d] for d in lb], dtype=np.float64)
    free_l = np.prod([lhs[d] for d in range(len(lhs)) if d not in lc and d not in lb])
    free_r = np.prod([rhs[d] for d in range(len(rhs)) if d not in rc and d not in rb])
    k = np.prod([lhs[d] for d in lc], dtype=np.float64)
    return float(2.0 * batch * free_l * free_r * k)


def dot_shapes(fn: Callable, *args, **kwargs) -> list[dict]:
    """Every distinct ``dot_general`` of one call ``fn(*args, **kwargs)`` (traced, not run):
    ``{"lhs", "rhs", "dtypes", "dimension_numbers", "count", "flops"}`` (``count``: executions per
    call, ``lax.scan`` bodies times their length; ``flops``: of one execution)."""
    counts: collections.Counter = collections.Counter()
    _walk(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr, 1.0, counts)
    return [
        {
            "lhs": list(k[0]),
            "rhs": list(k[1]),
            "dtypes": [k[2], k[3], k[5]],
            "dimension_numbers": [[list(x) for x in pair] for pair in k[4]],
            "count": n,
            "flops": _flops(k),
            "_key": k,
        }
        for k, n in counts.items()
    ]


def dot_programs(key: tuple, mesh=None, seed: int = 0) -> tuple:
    """The two jitted programs :func:`time_dot` times for the dot ``key`` and their operands:
    ``(loop, single, a, b)``; ``loop(a, b, reps)`` runs ``reps`` dots in a ``fori_loop`` (each
    iteration adds a 1e-30-scaled element of its result into its left operand, so XLA can neither
    hoist the dot out of the loop nor merge iterations), ``single(a, b)`` one dot. With ``mesh``
    (1-D), the operands get a leading axis of the mesh size sharded over it and both programs run
    under ``shard_map``: every device computes its own copy at the key's shape, all at once, as
    the devices of a sharded step do."""
    lhs_shape, rhs_shape, ldt, rdt, dn, pref = key
    n = 1 if mesh is None else mesh.devices.size
    lead = () if mesh is None else (n,)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    a = jax.random.normal(k1, lead + tuple(lhs_shape), jnp.float32).astype(ldt)
    b = jax.random.normal(k2, lead + tuple(rhs_shape), jnp.float32).astype(rdt)
    corner = (0,) * len(lhs_shape)

    def dot(a, b):
        return jax.lax.dot_general(a, b, dn, preferred_element_type=pref)

    def loop(a, b, reps):
        def body(_, a):
            nudge = (dot(a, b).reshape(-1)[0] * 1e-30).astype(a.dtype)
            return a.at[corner].add(nudge)

        return jax.lax.fori_loop(0, reps, body, a)

    if mesh is None:
        return jax.jit(loop), jax.jit(dot), a, b
    axis = mesh.axis_names[0]
    spec, sharding = P(axis), NamedSharding(mesh, P(axis))
    a, b = jax.device_put(a, sharding), jax.device_put(b, sharding)

    def per_device(f, n_rep=0):
        def g(a, b, *rest):  # this device's block [1, ...] -> its copy of the dot
            return f(a[0], b[0], *rest)[None]

        specs = (spec, spec) + (P(),) * n_rep
        return jax.jit(jax.shard_map(g, mesh=mesh, in_specs=specs, out_specs=spec))

    return per_device(loop, 1), per_device(dot), a, b


def time_dot(
    key: tuple, min_time: float = 0.2, seed: int = 0, run_s: float = 0.01, mesh=None
) -> float:
    """Seconds of one ``dot_general`` of ``key`` (see :func:`_dot_key`), the faster of two
    best-of timings (each over at least 5 runs and ``min_time / 2`` seconds): a jitted
    ``fori_loop`` of ``reps`` dots sized to about ``run_s`` seconds (no per-call dispatch in the
    number; see :func:`dot_programs`), and one jitted dot per call, as
    :func:`benchmarks.meta_step.machine.matmul_peak` times the big square. Taking the faster keeps
    the ceiling an upper bound. With ``mesh``, every device of it runs its own copy of the dot at
    the same time (:func:`dot_programs`) and the result is the seconds until all have finished."""
    loop, single, a, b = dot_programs(key, mesh, seed)

    def timed(reps):
        reps = jnp.int32(reps)
        t0 = time.perf_counter()
        jax.block_until_ready(loop(a, b, reps))
        return time.perf_counter() - t0

    timed(1)  # compile (the trip count is an argument: one compilation)
    dt = min(timed(1) for _ in range(3))
    reps = int(np.clip(run_s / max(dt, 1e-7), 1, 1 << 16))
    best, total, n = float("inf"), 0.0, 0
    while n < 5 or total < min_time / 2:
        dt = timed(reps)
        best, total, n = min(best, dt), total + dt, n + 1
    # the same dot called alone (as matmul_peak times it): its best call, if that is faster
    jax.block_until_ready(single(a, b))
    one, total, n = float("inf"), 0.0, 0
    while n < 5 or total < min_time / 2:
        t0 = time.perf_counter()
        jax.block_until_ready(single(a, b))
        dt = time.perf_counter() - t0
        one, total, n = min(one, dt), total + dt, n + 1
    return min(best / reps, one)


def square_key(n: int) -> tuple:
    """The dot key of the big square ``[n, n] @ [n, n]`` in float32."""
    return ((n, n), (n, n), "float32", "float32", (((1,), (0,)), ((), ())), None)


def sharded_square(n: int, mesh, min_time: float = 0.5) -> dict:
    """The big square run on every device of ``mesh`` at once (:func:`time_dot` with ``mesh``):
    ``{"n", "devices", "seconds", "flops_per_s"}``, the FLOP rate of all devices together."""
    sec = time_dot(square_key(n), min_time=min_time, mesh=mesh)
    d = int(mesh.devices.size)
    return {"n": n, "devices": d, "seconds": sec, "flops_per_s": d * 2.0 * n**3 / sec}


def per_device_args(tasks, weights, n_devices: int) -> tuple:
    """One device's share of a meta-batch sharded over ``n_devices`` along the task axis: the
    first ``T / n_devices`` tasks and weights (shapes are what matters: the per-device program of
    the sharded step is the step at ``T / n_devices`` tasks and chunks of ``chunk / n_devices``,
    :func:`metarec.meta.step.make_meta_step` giving each device its slice of every chunk)."""
    T = int(jax.tree_util.tree_leaves(tasks)[0].shape[0])
    if T % n_devices:
        raise ValueError(f"{T} tasks do not split over {n_devices} devices")
    m = T // n_devices
    return jax.tree_util.tree_map(lambda a: a[:m], tasks), weights[:m]


def shape_ceiling(
    fn: Callable,
    *args,
    peak_flops_per_s: float | None = None,
    min_time: float = 0.2,
    mesh=None,
    **kwargs,
) -> dict:
    """The matmul ceiling of ``fn(*args, **kwargs)`` (see the module docstring).

    Returns ``{"matmul_flops", "matmul_s"`` (the step's dots, each timed alone at its shape, times
    its count), ``"matmul_flops_per_s"`` (their rate), ``"matmul_peak_fraction"`` (that rate over
    ``peak_flops_per_s``), ``"devices"``, ``"shapes"`` (per distinct dot: shapes, count, GFLOP/s,
    share of ``matmul_s``)}``. A step of ``F`` FLOPs then runs at most at ``F / matmul_s`` FLOP/s.

    With ``mesh``, ``fn(*args)`` is ONE device's program of a step sharded over the mesh (e.g. the
    step at :func:`per_device_args`) and each of its dots is timed on every device at once
    (:func:`time_dot` with ``mesh``): ``matmul_s`` is then the seconds the devices' matmuls take
    side by side, ``matmul_flops`` those of all devices together (the sharded step's), and each
    shape's ``flops_per_s`` that of one device.
    """
    shapes = dot_shapes(fn, *args, **kwargs)
    n_dev = 1 if mesh is None else int(mesh.devices.size)
    total_s = total_f = 0.0
    for s in shapes:
        t = time_dot(s.pop("_key"), min_time=min_time, mesh=mesh)
        s["seconds"] = t
        s["flops_per_s"] = s["flops"] / t if t > 0 else None
        total_s += s["count"] * t
        total_f += n_dev * s["count"] * s["flops"]
    for s in shapes:
        s["time_share"] = s["count"] * s["seconds"] / total_s if total_s else None
    shapes.sort(key=lambda s: -(s["time_share"] or 0.0))
    rate = total_f / total_s if total_s else None
    return {
        "matmul_flops": total_f,
        "matmul_s": total_s,
        "matmul_flops_per_s": rate,
        "matmul_peak_fraction": rate / peak_flops_per_s if rate and peak_flops_per_s else None,
        "devices": n_dev,
        "shapes": shapes,
    }
