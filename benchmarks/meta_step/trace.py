"""The device timeline of the vmapped meta-step: a ``jax.profiler`` trace of a few steps with
device-side input, summarised per device stream (kernels per step, busy fraction, the longest
kernels). On a GPU this says whether a step is latency-bound (short kernels with the device idle
between them) or compute-bound; the per-HLO-op profile of :mod:`profile` reads CPU traces only.

  python -m benchmarks.meta_step.trace --meta_batch=32,4096 --workdir=/tmp/trace

writes ``trace.json`` (one summary per meta-batch) and, with ``--keep_trace``, the raw
``*.xplane.pb`` files (TensorBoard's profile plugin or Perfetto open them).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import flags

from benchmarks.meta_step.config import HEADLINE, BenchConfig
from benchmarks.meta_step.flops import count_flops
from benchmarks.meta_step.problems import CLIP_NORM, build_problem, device_batches
from benchmarks.meta_step.steps import make_step
from experiments import common


def _union_ns(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarise_planes(planes, n_steps: int, top: int = 10) -> list[dict]:
    """Per line of every device plane (``/device:...``; all non-Python lines where there is none,
    as on a CPU): events and busy time per step, the busy fraction of the line's span and the
    ``top`` event names by time. ``planes`` are ``jax.profiler.ProfileData`` planes."""
    planes = list(planes)
    device = [p for p in planes if p.name.startswith("/device:")]
    out = []
    for plane in device or planes:
        for line in plane.lines:
            if "python" in line.name.lower():
                continue
            evs = [(e.name, e.start_ns, e.duration_ns) for e in line.events if e.duration_ns > 0]
            if not evs:
                continue
            spans = [(s, s + d) for _, s, d in evs]
            span = max(e for _, e in spans) - min(s for s, _ in spans)
            busy = _union_ns(spans)
            by_name: collections.Counter = collections.Counter()
            for name, _, d in evs:
                by_name[name] += d
            out.append(
                {
                    "plane": plane.name,
                    "line": line.name,
                    "events_per_step": len(evs) / n_steps,
                    "busy_ms_per_step": busy / n_steps * 1e-6,
                    "span_ms": span * 1e-6,
                    "busy_fraction": busy / span if span else None,
                    "mean_event_us": sum(d for *_, d in evs) / len(evs) * 1e-3,
                    "top": [[k, v / n_steps * 1e-6] for k, v in by_name.most_common(top)],
                }
            )
    return out


def trace_step(cfg: BenchConfig, n_steps: int = 10, keep_dir: str | None = None) -> dict:
    """Compile the vmapped step of ``cfg``, run it twice, then trace ``n_steps`` steps fed from
    device-side batches; the timeline summary, wall time per step and FLOPs per step. The step
    runs without a dropout key (no feature dropout), so no per-step key split is dispatched."""
    problem = build_problem(cfg)
    step = make_step(problem.learner, problem.optimizer, "vmap", clip_norm=CLIP_NORM)
    batches = device_batches(problem.pool, cfg.meta_batch)
    weights = jnp.ones((cfg.meta_batch,))
    mp, st = problem.meta_params, problem.opt_state
    first = next(batches)
    compiled = step.lower(mp, st, first, weights, None).compile()
    flops = count_flops(step, mp, st, first, weights, None)["flops"]
    for _ in range(2):
        mp, st, *_ = compiled(mp, st, next(batches), weights, None)
    jax.block_until_ready(mp)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            for _ in range(n_steps):
                mp, st, *_ = compiled(mp, st, next(batches), weights, None)
            jax.block_until_ready(mp)
        wall = (time.perf_counter() - t0) / n_steps
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return {"label": cfg.short(), "error": "the profiler wrote no trace"}
        if keep_dir:
            os.makedirs(keep_dir, exist_ok=True)
            shutil.copy(files[0], os.path.join(keep_dir, f"T{cfg.meta_batch}.xplane.pb"))
        planes = jax.profiler.ProfileData.from_file(files[0]).planes
        lines = summarise_planes(planes, n_steps)
    return {
        "label": cfg.short(),
        "meta_batch": cfg.meta_batch,
        "wall_ms_per_step_traced": wall * 1e3,
        "flops_per_step": flops,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "lines": lines,
    }


flags.DEFINE_list("meta_batch", ["32", "4096"], "Meta-batch sizes to trace (headline config).")
flags.DEFINE_integer("steps", 10, "Steps traced per meta-batch.", lower_bound=1)
flags.DEFINE_bool("keep_trace", False, "Also copy the raw xplane.pb files to --workdir.")
common.define_run_flags("runs/trace", resumable=False)
FLAGS = flags.FLAGS


def main() -> None:
    try:
        sizes = [int(v) for v in FLAGS.meta_batch]
    except ValueError:
        got = ",".join(FLAGS.meta_batch)
        raise ValueError(f"--meta_batch takes integers, got {got!r}") from None
    workdir = common.prepare_workdir(FLAGS.workdir, "trace")
    keep = workdir if FLAGS.keep_trace else None
    out = []
    for t in sizes:
        cfg = BenchConfig(**(HEADLINE | dict(meta_batch=t)), learner="maml", section="trace")
        r = trace_step(cfg, FLAGS.steps, keep)
        out.append(r)
        print(f"{r['label']}: {r.get('wall_ms_per_step_traced', float('nan')):.3f} ms/step traced")
        for ln in r.get("lines", []):
            frac = ln["busy_fraction"]
            print(
                f"  {ln['plane']} | {ln['line']}: {ln['events_per_step']:.0f} events/step, "
                f"busy {ln['busy_ms_per_step']:.3f} ms/step"
                + (f" ({frac:.0%} of span)" if frac is not None else "")
                + f", mean {ln['mean_event_us']:.1f} us"
            )
    path = os.path.join(workdir, "trace.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    common.run_main("trace", main)
