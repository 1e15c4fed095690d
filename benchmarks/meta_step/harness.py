"""The whole benchmark run: the machine's peaks, every configuration in each of its modes, memory
vs inner steps, profiles, the sharded-step check and the targets; returns the ``benchmark.json``
dict (:data:`TOP_KEYS`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from benchmarks.meta_step import ceiling as bceiling
from benchmarks.meta_step import machine
from benchmarks.meta_step.config import HEADLINE, BenchConfig, Settings
from benchmarks.meta_step.measure import compiled_temp_bytes, compute_dtype, measure
from benchmarks.meta_step.problems import CLIP_NORM, build_problem, sample_batches
from benchmarks.meta_step.profile import profile_ops
from benchmarks.meta_step.report import malloc_line
from benchmarks.meta_step.steps import grad_capture, make_step
from metarec.meta import step as mstep
from metarec.training.compile_time import compile_seconds, split_seconds

#: top-level keys of ``benchmark.json``
TOP_KEYS = tuple(
    """command preset machine settings load_average matmul_peak memory_bandwidth records
    comparisons memory_vs_inner_steps profiles ceilings devices targets wall_s compile_s
    compute_s failures""".split()
)

TARGETS = {
    # vmapped 2nd-order MAML at the headline configuration vs the per-task loop
    "vmap_over_loop_maml_mb32": 10.0,
    # best fraction of the matmul peak at a large configuration
    "large_config_peak_fraction": 0.25,
    # best fraction of the matmul peak of the headline second-order MAML step (any library
    # execution: vmap, chunked, sparse tables, lax.map)
    "headline_peak_fraction": 0.35,
}
#: configuration fields that make two records the same meta-step
_SAME_STEP = tuple(
    """data meta_batch support query inner_steps width embed_dim dtype remat dropout devices
    n_items""".split()
)


def _ratio(a, b):
    return None if not a or not b else a / b


def memory_vs_inner_steps(settings: Settings, pools: dict, log_fn: Callable = print) -> list[dict]:
    """Compiled temp bytes of the vmapped second-order MAML step for each inner-step count in
    ``settings.memory_steps``, with and without remat (compile only; no dropout key)."""
    out = []
    for k in settings.memory_steps:
        for remat in (False, True):
            fields = HEADLINE | settings.memory_config | dict(inner_steps=k)
            cfg = BenchConfig(**fields, learner="maml", remat=remat, dropout=0.0, section="memory")
            machine.reset_peak_rss()
            m = compiled_temp_bytes(build_problem(cfg, pools, settings.seed))
            row = {
                "inner_steps": k,
                "remat": remat,
                "meta_batch": cfg.meta_batch,
                "support": cfg.support,
                "width": cfg.width,
                "temp_bytes": m["temp_bytes"],
                "compile_s": m["compile_s"],
                "peak_rss_bytes": machine.peak_rss_bytes(),
            }
            log_fn(
                f"  memory K={k:3d} remat={remat!s:5s}: temp {m['temp_bytes'] / 2**20:9.2f} MiB "
                f"(compile {m['compile_s']:.1f}s)"
            )
            out.append(row)
    return out


def _log_record(log_fn: Callable, cfg: BenchConfig, mode: str, r: dict) -> None:
    log_fn(
        f"  {cfg.section:11s} {cfg.short():46s} {mode:4s} {r['steps_per_s']:9.2f} steps/s "
        f"{r['tasks_per_s']:10.1f} tasks/s  compile {r['compile_s']:6.1f}s  "
        f"{r['achieved_flops_per_s'] / 1e9:7.2f} GFLOP/s "
        f"({100 * (r['peak_fraction'] or 0):5.1f}% peak)  "
        f"wait {100 * r['input_wait_fraction']:4.1f}%  "
        f"faults/step {r['minor_faults_per_step']:.0f}"
    )


def _wants_ceiling(cfg: BenchConfig, mode: str) -> bool:
    head = cfg.learner == "maml" and cfg.section in ("headline", "ceiling")
    return head and mode != "loop"


def _ceiling_program(problem, keep: dict, mode: str = "vmap") -> tuple:
    """``(fn, args, mesh)`` whose dots bound the step: the step itself on one device; for a step
    sharded over ``D`` devices (its jaxpr has the global shapes), one device's program, the same
    step (in ``mode``: dense or row-gathered tables) at ``T / D`` tasks in chunks of
    ``chunk / D``, with the mesh to time its dots on."""
    cfg = problem.cfg
    if cfg.devices == 1:
        return keep["step"], keep["args"], None
    d = cfg.devices
    local = make_step(
        problem.learner,
        problem.optimizer,
        mode,
        chunk_size=None if cfg.chunk is None else cfg.chunk // d,
        clip_norm=CLIP_NORM,
        compute_dtype=compute_dtype(cfg),
        sparse_tables=problem.tables,  # used by mode "sparse" only
    )
    mp, st, tasks, weights, key = keep["args"]
    tasks, weights = bceiling.per_device_args(tasks, weights, d)
    return local, (mp, st, tasks, weights, key), mstep.make_mesh(d)


def _add_ceiling(
    record: dict, problem, keep: dict, peak: dict, settings: Settings, log_fn, mode: str = "vmap"
) -> dict:
    """Time the step's own matmul shapes (:func:`bceiling.shape_ceiling`; a sharded step's on all
    its devices at once, :func:`_ceiling_program`) and fill the record's ``ceiling_*`` fields:
    the step's FLOP rate if everything but its matmuls took no time, that rate over the peak, and
    the achieved rate over it (= matmul seconds / step seconds)."""
    fn, args, mesh = _ceiling_program(problem, keep, mode)
    c = bceiling.shape_ceiling(
        fn,
        *args,
        peak_flops_per_s=peak["flops_per_s"],
        min_time=settings.ceiling_min_time,
        mesh=mesh,
    )
    rate = record["flops_per_step"] / c["matmul_s"]
    record["ceiling_flops_per_s"] = rate
    record["ceiling_peak_fraction"] = rate / peak["flops_per_s"]
    record["ceiling_fraction"] = record["achieved_flops_per_s"] / rate
    where = "" if mesh is None else f" (on {c['devices']} devices at once)"
    log_fn(
        f"    ceiling: its matmuls alone{where} {1e3 * c['matmul_s']:.1f} ms/step at "
        f"{c['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s -> step at most "
        f"{100 * record['ceiling_peak_fraction']:.1f}% of peak; measured "
        f"{100 * record['ceiling_fraction']:.1f}% of that ceiling"
    )
    return {"label": record["label"], "mode": record["mode"]} | c


def _failure(cfg: BenchConfig, mode: str, error: Exception) -> dict:
    """A configuration that ran out of device memory: where, and the first line of the error."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return {
        "section": cfg.section,
        "label": cfg.short(),
        "mode": mode,
        "config": cfg.as_dict(),
        "error": first[:300],
        "device_peak_bytes": machine.device_peak_bytes(),
    }


def _comparison(cfg: BenchConfig, by_mode: dict) -> dict:
    rate = {m: r["steps_per_s"] for m, r in by_mode.items()}
    return {
        "section": cfg.section,
        "label": cfg.short(),
        "config": cfg.as_dict(),
        "steps_per_s": rate,
        "vmap_over_loop": _ratio(rate.get("vmap"), rate.get("loop")),
        "vmap_over_map": _ratio(rate.get("vmap"), rate.get("map")),
        "map_over_loop": _ratio(rate.get("map"), rate.get("loop")),
        # row-gathered embedding tables over the dense per-task table gradient
        "sparse_over_vmap": _ratio(rate.get("sparse"), rate.get("vmap")),
    }


def run_benchmark(
    grid: Sequence[BenchConfig],
    settings: Settings,
    *,
    log_fn: Callable = print,
    command: str = "",
    preset: str = "custom",
) -> dict:
    """Run every configuration of ``grid`` in each of its modes plus the matmul peak, memory vs
    inner steps, profiles and the device check; return the ``benchmark.json`` dict
    (:data:`TOP_KEYS`)."""
    t_start, compiled_before = time.perf_counter(), compile_seconds()
    load_before = machine.load_average()
    log_fn(f"command: {command}")
    info = machine.machine_info()
    log_fn(
        f"machine: {info['cpu_model']} x{info['cpu_count']} cores "
        f"({' '.join(info['cpu_vector_flags']) or 'vector extensions unknown'}), "
        f"jax {info['jax']}, backend "
        f"{info['backend']}, {len(info['devices'])} device(s), load average {load_before}; "
        f"allocator: {malloc_line(info['malloc'])}"
    )
    dtypes = sorted({c.dtype for c in grid} | {"float32"})
    peaks = {}
    for dt in dtypes:
        peaks[dt] = machine.matmul_peak(dt, settings.matmul_sizes, settings.matmul_min_time)
        log_fn(
            f"matmul peak {dt}: {peaks[dt]['flops_per_s'] / 1e9:.1f} GFLOP/s "
            f"(n={peaks[dt]['best_n']})"
        )
    bw = machine.memory_bandwidth(min_time=settings.matmul_min_time)
    log_fn(f"memory bandwidth: {bw['bytes_per_s'] / 1e9:.2f} GB/s")
    pools: dict = {}
    records, comparisons, profiles, failures = [], [], {}, []
    ceilings: dict = {"square": None, "square_sharded": None, "steps": []}
    wanted = [c for c in grid for m in c.modes if _wants_ceiling(c, m)]
    if settings.ceiling and wanted:
        # the big-square peak timed by the ceiling's own loop, to compare the two timing methods
        n = peaks["float32"]["best_n"]
        sec = bceiling.time_dot(bceiling.square_key(n), min_time=settings.matmul_min_time)
        ceilings["square"] = {"n": n, "flops_per_s": 2.0 * n**3 / sec}
        log_fn(f"matmul n={n} timed like the ceiling's shapes: {2e-9 * n**3 / sec:.1f} GFLOP/s")
        p = peaks["float32"]
        p["peak_method_flops_per_s"] = p["flops_per_s"]
        rates = {"matmul_peak": p["flops_per_s"], "ceiling_loop": ceilings["square"]["flops_per_s"]}
        d = max(c.devices for c in wanted)
        if d > 1:
            # the same square on every device at once: if the devices together beat one device's
            # thread pool, that is the peak the sharded steps are measured against
            sq = bceiling.sharded_square(n, mstep.make_mesh(d), settings.matmul_min_time)
            ceilings["square_sharded"] = sq
            rates[f"sharded_{d}"] = sq["flops_per_s"]
            log_fn(
                f"matmul n={n} on {d} devices at once: {sq['flops_per_s'] / 1e9:.1f} GFLOP/s "
                "(all devices together)"
            )
        # every timing is of the same big square: the fastest is the best estimate of the peak
        # (load from other jobs only slows a timing down), and every fraction below uses it
        p["peak_from"] = max(rates, key=rates.get)
        p["flops_per_s"] = rates[p["peak_from"]]
    for cfg in grid:
        problem = build_problem(cfg, pools, settings.seed)
        by_mode = {}
        for mode in cfg.modes:
            keep: dict = {}
            try:
                r = measure(
                    problem,
                    mode,
                    min_time=settings.min_time,
                    min_steps=settings.min_steps,
                    peak=peaks[cfg.dtype],
                    seed=settings.seed,
                    keep=keep,
                    device_input=settings.device_input,
                    warmup_s=settings.warmup_s,
                )
            except Exception as e:
                if not (settings.skip_out_of_memory and machine.is_out_of_memory(e)):
                    raise
                failures.append(_failure(cfg, mode, e))
                log_fn(f"  {cfg.section:11s} {cfg.short():46s} {mode:4s} out of memory: skipped")
                continue
            records.append(r)
            by_mode[mode] = r
            _log_record(log_fn, cfg, mode, r)
            if settings.ceiling and _wants_ceiling(cfg, mode) and keep:
                c = _add_ceiling(r, problem, keep, peaks[cfg.dtype], settings, log_fn, mode)
                ceilings["steps"].append(c)
            profiled = (cfg.section == "headline" and cfg.learner == "maml") or (
                cfg.section == "large"
            )
            if settings.profile and "compiled" in keep and (profiled or cfg.section == "ceiling"):
                prof = profile_ops(keep["compiled"], keep["args"])
                prof["label"], prof["steps_per_s"] = cfg.short(), r["steps_per_s"]
                profiles[cfg.short() + ("" if mode == "vmap" else f" {mode}")] = prof
        if len(by_mode) > 1:
            comparisons.append(_comparison(cfg, by_mode))
    log_fn("memory vs inner steps (vmapped second-order MAML, compiled temp bytes):")
    mem = memory_vs_inner_steps(settings, pools, log_fn) if settings.memory_steps else []
    devices = device_check(grid, pools, settings) if any(c.devices > 1 for c in grid) else None
    result = {
        "command": command,
        "preset": preset,
        "machine": info,
        "settings": dataclasses.asdict(settings),
        "load_average": {"before": load_before, "after": machine.load_average()},
        "matmul_peak": peaks,
        "memory_bandwidth": bw,
        "records": records,
        "comparisons": comparisons,
        "memory_vs_inner_steps": mem,
        "profiles": profiles,
        "ceilings": ceilings,
        "devices": devices,
        "targets": {},
        "wall_s": 0.0,
        "failures": failures,
    }
    result["targets"] = check_targets(result)
    timing = split_seconds(time.perf_counter() - t_start, compiled_before)
    result["wall_s"] = timing["wall_seconds"]
    result["compile_s"] = timing["compile_seconds"]  # tracing, lowering, XLA (JAX's own events)
    result["compute_s"] = timing["compute_seconds"]
    return result


def device_check(grid: Sequence[BenchConfig], pools: dict, settings: Settings) -> dict:
    """Correctness of the sharded step: the meta-gradient with the task axis sharded over N devices
    (:func:`grad_capture`) equals the single-device one, with dense tables and with row-gathered
    ones (``*_sparse``: the sharded step of mode ``sparse`` against the dense single-device one)."""
    n = max(c.devices for c in grid)
    cfg = BenchConfig(**HEADLINE, learner="maml", dropout=0.0, section="devices")
    problem = build_problem(cfg, pools, settings.seed, optimizer=grad_capture())
    batch = next(sample_batches(problem.pool, cfg.meta_batch, settings.seed))
    w = jnp.ones((cfg.meta_batch,), jnp.float32)
    single = make_step(problem.learner, problem.optimizer, "vmap", clip_norm=CLIP_NORM)
    g1 = single(problem.meta_params, problem.opt_state, jax.device_put(batch), w)[1]
    leaves1 = jax.tree_util.tree_leaves(g1)
    scale = max(float(jnp.max(jnp.abs(a))) for a in leaves1)
    mesh = mstep.make_mesh(n)
    args = (
        mstep.replicate(problem.meta_params, mesh),
        mstep.replicate(problem.opt_state, mesh),
        mstep.shard_tasks(batch, mesh),
        mstep.shard_tasks(w, mesh),
    )
    out = {"n_devices": n, "device_count": jax.device_count(), "max_abs_grad": scale}
    for mode, suffix in (("vmap", ""), ("sparse", "_sparse")):
        kw = dict(clip_norm=CLIP_NORM, mesh=mesh, sparse_tables=problem.tables)
        gn = make_step(problem.learner, problem.optimizer, mode, **kw)(*args)[1]
        leavesn = jax.tree_util.tree_leaves(gn)
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves1, leavesn, strict=True))
        out[f"max_abs_grad_diff{suffix}"] = diff
        out[f"grads_match{suffix}"] = bool(diff <= 1e-5 * max(scale, 1.0))
    return out


def _best_fraction(name: str, records: list) -> tuple[dict | None, dict]:
    """The record of ``records`` with the highest ``peak_fraction`` and target ``name``'s entry
    for it (value, target, met, where); ``(None, ...)`` with None values when there is none."""
    best = max(records, key=lambda r: r["peak_fraction"]) if records else None
    v = best["peak_fraction"] if best else None
    return best, {
        "value": v,
        "target": TARGETS[name],
        "met": None if v is None else bool(v >= TARGETS[name]),
        "where": f"{best['label']} {best['mode']}" if best else None,
    }


def _speedup_target(result: dict, name: str) -> dict:
    head = [
        c
        for c in result["comparisons"]
        if c["section"] == "headline" and c["config"]["learner"] == "maml"
    ]
    v = head[0]["vmap_over_loop"] if head else None
    out = {
        "value": v,
        "target": TARGETS[name],
        "met": None if v is None else bool(v >= TARGETS[name]),
        "where": head[0]["label"] if head else None,
        "bound": None,
        "best": None,
        "best_mode": None,
    }
    if not head:
        return out
    config, label = head[0]["config"], head[0]["label"]
    recs = [r for r in result["records"] if r["label"] == label and r["section"] == "headline"]
    loop = next((r for r in recs if r["mode"] == "loop"), None)
    peak = (result.get("matmul_peak") or {}).get(config["dtype"], {}).get("flops_per_s")
    if not (loop and peak and loop["flops_per_step"]):
        return out
    out["bound"] = loop["step_ms"] / 1e3 * peak / loop["flops_per_step"]
    # the same step in the library's other executions: lax.map here, chunked vmap in "chunk"
    same = [
        r
        for r in result["records"]
        if r["mode"] != "loop"
        and r["config"]["learner"] == "maml"
        and all(r["config"].get(k) == config.get(k) for k in _SAME_STEP)
    ]
    if same:
        best = max(same, key=lambda r: r["steps_per_s"])
        out["best"] = best["steps_per_s"] / loop["steps_per_s"]
        out["best_mode"] = f"{best['label']} {best['mode']}"
    return out


def check_targets(result: dict) -> dict:
    """Evaluate :data:`TARGETS` on a result dict: ``{name: {"value", "target", "met", "where",
    ...}}`` (value None when the run did not include the needed configuration).

    ``vmap_over_loop_maml_mb32`` also gets ``bound``: the largest vmap/loop ratio this machine can
    give at all, the loop's measured step time over the time the step's FLOPs take at 100% of the
    measured matmul peak. When ``bound < target`` the target is out of reach for any
    implementation of the step on this machine (the per-task loop is compute-bound, not
    dispatch-bound); ``best`` and ``best_mode`` report the fastest library execution (vmap, chunked
    vmap or ``lax.map``) of the same step over the loop.

    ``headline_peak_fraction``: the best fraction of the matmul peak of any library execution of
    the headline MAML step; ``bound`` is the highest matmul ceiling at the step's own shapes
    among them (:mod:`benchmarks.meta_step.ceiling`): below the target, no execution measured
    can reach it on this machine."""
    out = {}
    name = "vmap_over_loop_maml_mb32"
    out[name] = _speedup_target(result, name)
    name = "large_config_peak_fraction"
    large = [
        r
        for r in result["records"]
        if r["section"] in ("large", "width", "dtype") and r["peak_fraction"] is not None
    ]
    _, out[name] = _best_fraction(name, large)
    name = "headline_peak_fraction"
    head = [
        r
        for r in result["records"]
        if r["section"] in ("headline", "ceiling")
        and r["config"]["learner"] == "maml"
        and r["mode"] != "loop"
        and r["peak_fraction"] is not None
        and all(r["config"].get(k) == v for k, v in HEADLINE.items())
    ]
    best, out[name] = _best_fraction(name, head)
    ceils = [r["ceiling_peak_fraction"] for r in head if r.get("ceiling_peak_fraction")]
    cpu = [r["cpu_peak_fraction"] for r in head if r.get("cpu_peak_fraction")]
    out[name] |= {
        # the highest matmul ceiling of any execution measured (see benchmarks.meta_step.ceiling)
        "bound": max(ceils) if ceils else None,
        "best_ceiling_fraction": best.get("ceiling_fraction") if best else None,
        "cpu_value": max(cpu) if cpu else None,
    }
    return out
