"""Where the time of a compiled step goes: a ``jax.profiler`` trace turned into per-HLO-op times
grouped into categories (matmul / elementwise / data movement / loop control), which the report
uses to say what limits the step."""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp

from benchmarks.meta_step.flops import count_flops
from benchmarks.meta_step.measure import compute_dtype
from benchmarks.meta_step.problems import CLIP_NORM, Problem, sample_batches
from benchmarks.meta_step.steps import make_step

_CONTAINERS = re.compile(r"^(while|conditional|call|ThunkExecutor|Thunk|PjitFunction|\$)")
_HEAD = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_DATA_OPS = frozenset(
    """copy transpose gather scatter slice dynamic-slice dynamic-update-slice concatenate pad
    broadcast reshape bitcast iota copy-start copy-done""".split()
)
_STRUCTURE_OPS = frozenset({"parameter", "tuple", "get-tuple-element", "constant"})
_OP_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*op_name=\"([^\"]*)\"")


def _sources(hlo_text: str) -> dict[str, str]:
    """Map instruction name -> the JAX primitive it comes from (the last part of its
    ``op_name`` metadata), marked ``(bwd)`` inside a transpose (the backward pass)."""
    out = {}
    for line in hlo_text.splitlines():
        m = _OP_NAME.match(line)
        if m:
            name = m.group(2)
            # a combined op is named "(a/x:b/y)": its last primitive, without the ")"
            prim = name.split("/")[-1].rstrip(")")
            out[m.group(1)] = prim + (" (bwd)" if "transpose(" in name else "")
    return out


def _parse_hlo(hlo_text: str) -> tuple[dict[str, set], dict[str, tuple[str, list[str]]]]:
    """``(ops of each computation, {instruction: (op, called computations)})``."""
    comps: dict[str, set] = {}
    cur = None
    inst: dict[str, tuple[str, list[str]]] = {}
    for line in hlo_text.splitlines():
        if line.rstrip().endswith("{") and "=" not in line.split("{")[0].split("(")[0]:
            m = _HEAD.match(line)
            if m:
                cur = m.group(1)
                comps.setdefault(cur, set())
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, op = m.group(1), m.group(2)
        if cur is not None:
            comps[cur].add(op)
        inst[name] = (op, _CALLS.findall(line))
    return comps, inst


def _hlo_categories(hlo_text: str) -> dict[str, str]:
    """Map instruction name -> category from optimized HLO text: ``matmul`` (dot / convolution, or
    a fusion whose computation contains one), ``data`` (copy, transpose, gather, scatter, slices,
    concatenate, pad, broadcast, reshape...), ``loop`` (while / conditional / call),
    ``elementwise`` (every other fusion or op)."""
    comps, inst = _parse_hlo(hlo_text)

    def has_dot(comp):
        return bool(comps.get(comp, set()) & {"dot", "convolution"})

    def moves_data_only(comp):
        return comps.get(comp, set()) <= _DATA_OPS | _STRUCTURE_OPS

    out = {}
    for name, (op, calls) in inst.items():
        if op in ("dot", "convolution"):
            out[name] = "matmul"
        elif op in ("fusion", "custom-call") and any(has_dot(c) for c in calls):
            out[name] = "matmul"
        elif op in ("while", "conditional", "call"):
            out[name] = "loop"
        elif op in _DATA_OPS or (op == "fusion" and calls and all(map(moves_data_only, calls))):
            out[name] = "data"
        else:
            out[name] = "elementwise"
    return out


def profile_ops(compiled, args: tuple, n_runs: int = 3, top: int = 12) -> dict:
    """Trace ``n_runs`` executions of a compiled step with ``jax.profiler`` and aggregate the XLA
    thunk events by HLO instruction (summed over XLA threads).

    Returns ``{"wall_s", "op_s": total op time, "by_category": {matmul|elementwise|data|other: s},
    "fractions": {...}, "top_ops": [[name, category, seconds], ...], "by_source": [["category:
    primitive", seconds], ...], "n_events"}`` (a fusion counts under its root's primitive).
    Container events (while loops, executor wrappers) are excluded so nested ops are not counted
    twice. Where the trace cannot be read (no ``jax.profiler.ProfileData``) returns
    ``{"error": ...}``.
    """
    try:
        from jax.profiler import ProfileData
    except ImportError as e:  # pragma: no cover
        return {"error": f"jax.profiler.ProfileData unavailable: {e}"}
    text = compiled.as_text()
    cats, sources = _hlo_categories(text), _sources(text)
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            for _ in range(n_runs):
                out = compiled(*args)
            jax.block_until_ready(out)
        wall = time.perf_counter() - t0
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return {"error": "the profiler wrote no trace"}
        pdata = ProfileData.from_file(files[0])
        per_op: collections.Counter = collections.Counter()
        n_events = 0
        for plane in pdata.planes:
            for line in plane.lines:
                if line.name == "python" or "python" in line.name.lower():
                    continue
                for ev in line.events:
                    name = ev.name
                    if _CONTAINERS.match(name) or " " in name:
                        continue
                    per_op[name] += ev.duration_ns * 1e-9
                    n_events += 1
    by_cat: collections.Counter = collections.Counter()
    by_source: collections.Counter = collections.Counter()
    for name, s in per_op.items():
        base = name.split(":")[0]
        by_cat[cats.get(base, "other")] += s
        by_source[f"{cats.get(base, 'other')}: {sources.get(base, '?')}"] += s
    total = sum(by_cat.values())
    top_ops = [
        [k, cats.get(k.split(":")[0], "other"), v / n_runs] for k, v in per_op.most_common(top)
    ]
    return {
        "wall_s": wall / n_runs,
        "op_s": total / n_runs,
        "by_category": {k: v / n_runs for k, v in by_cat.items()},
        "fractions": {k: v / total for k, v in by_cat.items()} if total else {},
        "top_ops": top_ops,
        # op time by category and the JAX primitive the (fused) op comes from
        "by_source": [[k, v / n_runs] for k, v in by_source.most_common(top)],
        "n_events": n_events,
    }


def profile_problem(problem: Problem, n_runs: int = 3) -> dict:
    """:func:`profile_ops` of the vmapped step of ``problem`` on one meta-batch, plus its FLOPs."""
    cfg = problem.cfg
    step = make_step(
        problem.learner,
        problem.optimizer,
        "vmap",
        chunk_size=cfg.chunk,
        clip_norm=CLIP_NORM,
        compute_dtype=compute_dtype(cfg),
    )
    batch = next(sample_batches(problem.pool, cfg.meta_batch))
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    key = jax.random.PRNGKey(0) if cfg.dropout > 0 else None
    args = (problem.meta_params, problem.opt_state, batch, jnp.ones((cfg.meta_batch,)), key)
    compiled = step.lower(*args).compile()
    out = profile_ops(compiled, args, n_runs=n_runs)
    out["label"] = cfg.short()
    out["flops_per_step"] = count_flops(step, *args)["flops"]
    return out
