"""The matmul ceiling of a step at its own shapes: every ``dot_general`` of the step's jaxpr (loop
trip counts applied, batch axes as ``vmap`` leaves them, forward and backward), each timed alone
at its shape and dtype, summed. The step cannot run faster than its matmuls alone at the speed
this machine gives at those shapes, so ``step FLOPs / that time`` bounds the step's FLOP rate;
its fraction of the big-square matmul peak (:func:`benchmarks.meta_step.machine.matmul_peak`) is
the honest ceiling for a "% of peak" target on this CPU.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

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


def time_dot(key: tuple, min_time: float = 0.2, seed: int = 0, run_s: float = 0.01) -> float:
    """Seconds of one ``dot_general`` of ``key`` (see :func:`_dot_key`), the faster of two
    best-of timings (each over at least 5 runs and ``min_time / 2`` seconds): a jitted
    ``fori_loop`` of ``reps`` dots sized to about ``run_s`` seconds (no per-call dispatch in the
    number; each iteration adds a 1e-30-scaled element of its result into its left operand, so
    XLA can neither hoist the dot out of the loop nor merge iterations), and one jitted dot per
    call, as :func:`benchmarks.meta_step.machine.matmul_peak` times the big square. Taking the
    faster keeps the ceiling an upper bound."""
    lhs_shape, rhs_shape, ldt, rdt, dn, pref = key
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    a = jax.random.normal(k1, lhs_shape, jnp.float32).astype(ldt)
    b = jax.random.normal(k2, rhs_shape, jnp.float32).astype(rdt)
    corner = (0,) * len(lhs_shape)

    def run(a, b, reps):
        def body(_, a):
            out = jax.lax.dot_general(a, b, dn, preferred_element_type=pref)
            nudge = (out.reshape(-1)[0] * 1e-30).astype(a.dtype)
            return a.at[corner].add(nudge)

        return jax.lax.fori_loop(0, reps, body, a)

    f = jax.jit(run)  # the trip count is an argument: one compilation

    def timed(reps):
        reps = jnp.int32(reps)
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b, reps))
        return time.perf_counter() - t0

    timed(1)  # compile
    dt = min(timed(1) for _ in range(3))
    reps = int(np.clip(run_s / max(dt, 1e-7), 1, 1 << 16))
    best, total, n = float("inf"), 0.0, 0
    while n < 5 or total < min_time / 2:
        dt = timed(reps)
        best, total, n = min(best, dt), total + dt, n + 1
    # the same dot called alone (as matmul_peak times it): its best call, if that is faster
    g = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dn, preferred_element_type=pref))
    jax.block_until_ready(g(a, b))
    single, total, n = float("inf"), 0.0, 0
    while n < 5 or total < min_time / 2:
        t0 = time.perf_counter()
        jax.block_until_ready(g(a, b))
        dt = time.perf_counter() - t0
        single, total, n = min(single, dt), total + dt, n + 1
    return min(best / reps, single)


def shape_ceiling(
    fn: Callable, *args, peak_flops_per_s: float | None = None, min_time: float = 0.2, **kwargs
) -> dict:
    """The matmul ceiling of ``fn(*args, **kwargs)`` (see the module docstring).

    Returns ``{"matmul_flops", "matmul_s"`` (the step's dots, each timed alone at its shape, times
    its count), ``"matmul_flops_per_s"`` (their rate), ``"matmul_peak_fraction"`` (that rate over
    ``peak_flops_per_s``), ``"shapes"`` (per distinct dot: shapes, count, GFLOP/s, share of
    ``matmul_s``)}``. A step of ``F`` FLOPs then runs at most at ``F / matmul_s`` FLOP/s.
    """
    shapes = dot_shapes(fn, *args, **kwargs)
    total_s = total_f = 0.0
    for s in shapes:
        t = time_dot(s.pop("_key"), min_time=min_time)
        s["seconds"] = t
        s["flops_per_s"] = s["flops"] / t if t > 0 else None
        total_s += s["count"] * t
        total_f += s["count"] * s["flops"]
    for s in shapes:
        s["time_share"] = s["count"] * s["seconds"] / total_s if total_s else None
    shapes.sort(key=lambda s: -(s["time_share"] or 0.0))
    rate = total_f / total_s if total_s else None
    return {
        "matmul_flops": total_f,
        "matmul_s": total_s,
        "matmul_flops_per_s": rate,
        "matmul_peak_fraction": rate / peak_flops_per_s if rate and peak_flops_per_s else None,
        "shapes": shapes,
    }
