"""One measurement: compile and time one configuration in one execution mode.

A record (:data:`RECORD_KEYS`) holds steady-state meta-steps/s and tasks/s, compile time, XLA's
compiled memory analysis (temp / argument / output bytes), peak process RSS (Linux ``VmHWM``, reset
per measurement through ``/proc/self/clear_refs``) or device peak bytes where the backend reports
them, FLOPs per step (an exact count on the jaxpr, XLA's own count kept as ``xla_flops``), achieved
FLOP/s and its fraction of the machine's measured matmul peak in the same dtype, and the time the
step loop waits for its input pipeline.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.meta_step import machine
from benchmarks.meta_step.flops import count_flops, xla_cost
from benchmarks.meta_step.machine import DTYPES
from benchmarks.meta_step.problems import (
    CLIP_NORM,
    Prefetcher,
    Problem,
    device_batches,
    sample_batches,
)
from benchmarks.meta_step.steps import LoopStep, make_step
from metarec.meta import step as mstep

#: keys of every per-(configuration, mode) record in ``benchmark.json["records"]``
RECORD_KEYS = tuple(
    """section config mode n_tasks support query n_steps seconds steps_per_s tasks_per_s step_ms
    lower_s compile_s flops_per_step matmul_flops_per_step xla_flops xla_bytes_accessed
    achieved_flops_per_s peak_fraction temp_bytes argument_bytes output_bytes peak_rss_bytes
    device_peak_bytes input_wait_s_per_step input_wait_fraction minor_faults_per_step
    user_cpu_ms_per_step sys_cpu_ms_per_step cpu_peak_fraction final_loss finite ceiling_flops_per_s
    ceiling_peak_fraction ceiling_fraction device_input""".split()
)


def _gathered_on_device(batch):
    return batch


def _block(tree):
    return jax.block_until_ready(tree)


def compute_dtype(cfg):
    """The compute dtype of the step (None: the parameters' own float32)."""
    return None if cfg.dtype == "float32" else DTYPES[cfg.dtype]


def _compile(step, mode, prepare, first, mp, st, weights, key):
    """Lower and compile ``step``; returns ``(run, compiled, batch0, lower_s, compile_s)``. The loop
    mode compiles its per-task program (run T times per step) and its update."""
    if mode == "loop":
        one = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), first)
        t0 = time.perf_counter()
        lowered = step.task_fn.lower(mp, one, np.float32(1.0), key)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        step.task_call = compiled
        batch0 = prepare(first)
        _block(step(mp, st, batch0, weights, key))  # compiles finish() and split too
        t3 = time.perf_counter()
        return step, compiled, batch0, t1 - t0, (t2 - t1) + (t3 - t2)
    batch0 = prepare(first)
    t0 = time.perf_counter()
    lowered = step.lower(mp, st, batch0, weights, key)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, compiled, batch0, t1 - t0, t2 - t1


def measure(
    problem: Problem,
    mode: str,
    *,
    min_time: float = 1.0,
    min_steps: int = 3,
    max_steps: int = 10_000,
    peak: dict | None = None,
    seed: int = 0,
    section: str | None = None,
    keep: dict | None = None,
    device_input: bool = False,
    warmup_s: float = 0.0,
) -> dict:
    """Compile and time one configuration in one mode; returns a record with :data:`RECORD_KEYS`.

    Steady state: after compilation and one warm-up step, steps run back to back (asynchronous
    dispatch, parameters threaded from step to step) until ``min_time`` seconds and ``min_steps``
    steps have passed; the clock stops after ``block_until_ready`` on the final state. Input
    batches come from a :class:`Prefetcher`; the time spent waiting for it is reported separately.
    ``device_input``: the batches are gathered on the device from a copy of the task pool there
    (:func:`device_batches`; not for the loop mode or a sharded step), else on the host and then
    copied. ``warmup_s``: warm-up steps for at least this long after the first (an accelerator
    ramps its clocks and records its command buffers over the first executions).
    ``peak`` (from :func:`machine.matmul_peak` in the compute dtype) gives the ``peak_fraction``.
    If ``keep`` is a dict, the step, its arguments and its compiled executable are stored in it
    (``"step"``, ``"args"``, ``"compiled"`` for :func:`benchmarks.meta_step.profile.profile_ops`;
    not for the loop mode). The ``ceiling_*`` fields are None here;
    :func:`benchmarks.meta_step.harness.run_benchmark` fills them (:mod:`.ceiling`).
    """
    cfg = problem.cfg
    dtype = compute_dtype(cfg)
    mesh = mstep.make_mesh(cfg.devices) if cfg.devices > 1 else None
    step = make_step(
        problem.learner,
        problem.optimizer,
        mode,
        chunk_size=cfg.chunk,
        clip_norm=CLIP_NORM,
        compute_dtype=dtype,
        mesh=mesh,
        sparse_tables=problem.tables,
    )
    T = cfg.meta_batch
    weights = jnp.ones((T,), jnp.float32)
    mp, st = problem.meta_params, problem.opt_state
    device_input = device_input and mesh is None and mode != "loop"
    if mesh is not None:
        weights = mstep.shard_tasks(weights, mesh)
        mp, st = mstep.replicate(mp, mesh), mstep.replicate(st, mesh)

        def prepare(b):
            return mstep.shard_tasks(b, mesh)

    elif mode == "loop":
        prepare = LoopStep.prepare
    elif device_input:
        prepare = _gathered_on_device
    else:
        prepare = jax.device_put
    source = (device_batches if device_input else sample_batches)(problem.pool, T, seed)
    first = next(source)
    support, query = int(first.support.size), int(first.query.size)
    key = jax.random.PRNGKey(seed + 1) if cfg.dropout > 0 else None

    machine.reset_peak_rss()
    # compile, then FLOPs and memory of the compiled program (per task in the loop mode)
    run, compiled, batch0, lower_s, compile_s = _compile(
        step, mode, prepare, first, mp, st, weights, key
    )
    mem = machine.compiled_memory(compiled)
    cost = xla_cost(compiled)
    plain = make_step(
        problem.learner,
        problem.optimizer,
        "vmap",
        chunk_size=cfg.chunk,
        clip_norm=CLIP_NORM,
        compute_dtype=dtype,
    )
    host0 = jax.tree_util.tree_map(jnp.asarray, first)
    fl = count_flops(
        plain, problem.meta_params, problem.opt_state, host0, jnp.ones((T,), jnp.float32), key
    )

    # steady state
    state = _block(run(mp, st, batch0, weights, key))  # warm-up
    mp_, st_ = state[0], state[1]
    t_warm = time.perf_counter()
    while time.perf_counter() - t_warm < warmup_s:
        mp_, st_ = _block(run(mp_, st_, batch0, weights, key))[:2]
    if keep is not None and mode != "loop":
        keep["step"], keep["args"] = step, (mp, st, batch0, weights, key)
        keep["compiled"] = compiled
    pre = Prefetcher(source, prepare)
    try:
        pre.next()  # let the pipeline fill before the clock starts
        pre.wait_s = 0.0
        faults0, cpu0 = machine.minor_faults(), os.times()
        n, t_start = 0, time.perf_counter()
        while True:
            batch = pre.next()
            sub = None
            if key is not None:
                key, sub = jax.random.split(key)
            mp_, st_, metrics = run(mp_, st_, batch, weights, sub)
            n += 1
            if n >= max_steps:
                break
            if n >= min_steps and time.perf_counter() - t_start >= min_time:
                break
        metrics = _block(metrics)
        _block(mp_)
        seconds = time.perf_counter() - t_start
        faults, cpu1 = machine.minor_faults() - faults0, os.times()
        wait = pre.wait_s
    finally:
        pre.close()
    steps_per_s = n / seconds
    flops = fl["flops"]
    achieved = flops * steps_per_s
    return {
        "section": section or cfg.section,
        "config": cfg.as_dict(),
        "label": cfg.short(),
        "mode": mode,
        "n_tasks": T,
        "support": support,
        "query": query,
        "n_steps": n,
        "seconds": seconds,
        "steps_per_s": steps_per_s,
        "tasks_per_s": steps_per_s * T,
        "step_ms": 1e3 / steps_per_s,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "flops_per_step": flops,
        "matmul_flops_per_step": fl["matmul_flops"],
        "xla_flops": cost["flops"],
        "xla_bytes_accessed": cost["bytes_accessed"],
        "achieved_flops_per_s": achieved,
        "peak_fraction": achieved / peak["flops_per_s"] if peak else None,
        "temp_bytes": mem["temp_bytes"],
        "argument_bytes": mem["argument_bytes"],
        "output_bytes": mem["output_bytes"],
        "peak_rss_bytes": machine.peak_rss_bytes(),
        "device_peak_bytes": machine.device_peak_bytes(),
        "input_wait_s_per_step": wait / n,
        "input_wait_fraction": wait / seconds,
        "minor_faults_per_step": faults / n,
        # process CPU time (all threads, the prefetch thread included): user = compute,
        # sys = kernel, mostly zeroing fresh pages of temporaries
        "user_cpu_ms_per_step": 1e3 * (cpu1.user - cpu0.user) / n,
        "sys_cpu_ms_per_step": 1e3 * (cpu1.system - cpu0.system) / n,
        # FLOPs per CPU-second of the step over those of the big-square matmul: the fraction of
        # peak if the step kept every core busy; it hardly moves with load from other jobs
        "cpu_peak_fraction": _cpu_fraction(flops, cpu0, cpu1, n, peak),
        "final_loss": float(metrics["loss"]),
        "finite": bool(metrics["finite"]),
        "ceiling_flops_per_s": None,
        "ceiling_peak_fraction": None,
        "ceiling_fraction": None,
        "device_input": device_input,
    }


def _cpu_fraction(flops, cpu0, cpu1, n, peak) -> float | None:
    cpu_s = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / n
    if not peak or not peak.get("flops_per_cpu_s") or cpu_s <= 0:
        return None
    return flops / cpu_s / peak["flops_per_cpu_s"]


def compiled_temp_bytes(problem: Problem, chunk: int | None = None) -> dict:
    """Compiled memory analysis of the vmapped step of ``problem`` without running it (cheap and
    deterministic): used for memory vs inner steps with and without remat."""
    cfg = problem.cfg
    step = make_step(
        problem.learner,
        problem.optimizer,
        "vmap",
        chunk_size=chunk or cfg.chunk,
        clip_norm=CLIP_NORM,
        compute_dtype=compute_dtype(cfg),
    )
    batch = next(sample_batches(problem.pool, cfg.meta_batch))
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    key = jax.random.PRNGKey(0) if cfg.dropout > 0 else None
    t0 = time.perf_counter()
    lowered = step.lower(
        problem.meta_params, problem.opt_state, batch, jnp.ones((cfg.meta_batch,)), key
    )
    compiled = lowered.compile()
    return machine.compiled_memory(compiled) | {"compile_s": time.perf_counter() - t0}
