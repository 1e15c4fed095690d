"""FLOPs of a step: an exact count on the jaxpr (loop trip counts applied) and XLA's own cost
analysis of the compiled program (which counts a while-loop body once)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np


def xla_cost(compiled) -> dict:
    """XLA's ``cost_analysis()`` of a compiled program: ``flops``, ``bytes_accessed``,
    ``transcendentals``. XLA counts the body of a while loop (``lax.scan``) ONCE, whatever its
    trip count, so for the meta-step these undercount; see :func:`count_flops`."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # pragma: no cover
        ca = None
    if isinstance(ca, (list, tuple)):  # older jax returned one dict per device program
        ca = ca[0] if ca else None
    ca = ca or {}
    return {
        "flops": float(ca.get("flops", 0.0)),
        "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
        "transcendentals": float(ca.get("transcendentals", 0.0)),
    }


_ELEMENTWISE = frozenset(
    """add sub mul div rem max min neg abs sign exp exp2 log log1p expm1 tanh logistic sin cos sqrt
    rsqrt cbrt pow integer_pow square select_n erf erf_inv atan2 floor ceil round clamp nextafter
    add_any reciprocal is_finite eq ne lt le gt ge and or not xor""".split()
)
_REDUCTIONS = frozenset(
    """reduce_sum reduce_max reduce_min reduce_prod argmax argmin reduce_and reduce_or cumsum cummax
    cumlogsumexp""".split()
)


def _size(aval) -> int:
    return int(np.prod(getattr(aval, "shape", ()), dtype=np.int64))


def _sub_jaxprs(eqn) -> list:
    subs = []
    for v in eqn.params.values():
        for j in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(j, jax.extend.core.ClosedJaxpr):
                subs.append(j.jaxpr)
            elif isinstance(j, jax.extend.core.Jaxpr):
                subs.append(j)
    return subs


def _jaxpr_flops(jaxpr) -> tuple[float, float]:
    """(matmul FLOPs, other FLOPs) of a ``core.Jaxpr`` with loop trip counts applied."""
    mm = other = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        outs = eqn.outvars
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = int(np.prod([lhs[d] for d in lc], dtype=np.int64))
            mm += 2.0 * _size(outs[0].aval) * k
            continue
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            out_feature_dim = dn.rhs_spec[0]
            k = int(np.prod(rhs, dtype=np.int64)) // max(int(rhs[out_feature_dim]), 1)
            mm += 2.0 * _size(outs[0].aval) * k
            continue
        subs = _sub_jaxprs(eqn)
        if subs:
            counts = [_jaxpr_flops(s) for s in subs]
            if name == "cond":  # one branch runs: count the most expensive
                m, o = max(counts, key=lambda c: c[0] + c[1])
            else:  # scan body x length; while body/cond once per (unknown) trip; calls once
                m, o = sum(c[0] for c in counts), sum(c[1] for c in counts)
            mult = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
            if name == "shard_map":  # the body runs once per device of its manual axes
                mesh = eqn.params["mesh"]
                axes = eqn.params.get("manual_axes", mesh.axis_names)
                mult = float(np.prod([mesh.shape[a] for a in axes]))
            mm, other = mm + mult * m, other + mult * o
            continue
        if name in _ELEMENTWISE:
            other += float(sum(_size(o.aval) for o in outs))
        elif name in _REDUCTIONS:
            other += float(sum(_size(i.aval) for i in eqn.invars if hasattr(i, "aval")))
    return mm, other


def count_flops(fn: Callable, *args, **kwargs) -> dict:
    """FLOPs of one call ``fn(*args, **kwargs)`` counted on its jaxpr (traced, not run).

    ``dot_general``/convolutions count exactly (2 x output size x contracted size), element-wise
    ops one FLOP per output element, reductions one per input element (XLA's conventions);
    ``lax.scan`` bodies are multiplied by the scan length, ``shard_map`` bodies by their number of
    devices, ``cond`` counts its most expensive branch, a ``while_loop`` body once per call (its
    trip count is not static). Returns
    ``{"flops", "matmul_flops", "other_flops"}``. Unlike ``compiled.cost_analysis()`` this is the
    work of the algorithm before XLA's simplifications and with loop trip counts applied.
    """
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    mm, other = _jaxpr_flops(closed.jaxpr)
    return {"flops": mm + other, "matmul_flops": mm, "other_flops": other}
