"""Benchmark of the vmapped meta-step against a per-task Python loop and ``lax.map``.

For each meta-learner and a grid of configurations, measures steady-state meta-steps/s and tasks/s,
compile time, compiled memory and peak RSS, FLOP/s as a fraction of the measured matmul peak, input
pipeline stalls, memory vs inner steps with/without remat, and a per-op profile; prints tables and
writes ``benchmark.json`` (keys: ``metarec.bench.TOP_KEYS``) to --workdir.

  python -m experiments.benchmark --quick --workdir=/tmp/bench_quick        # ~1-2 min on 2 cores
  python -m experiments.benchmark --workdir=runs/bench                      # ~10 min on 2 cores
  python -m experiments.benchmark --sections=headline --learners=maml,fomaml --workdir=/tmp/b
  python -m experiments.benchmark --sections= --meta_batch=32,128 --inner_steps=1,5 --modes=vmap,loop
  python -m experiments.benchmark --quick --devices=4 --workdir=/tmp/b4    # 4 CPU devices (mesh)

--devices=N on CPU splits the host into N XLA devices (``jax_num_cpu_devices``, equivalent to
XLA_FLAGS=--xla_force_host_platform_device_count=N): a correctness / overhead check of the sharded
step, not a speed-up on 2 cores. On several hosts, run one process per host, each calling
``jax.distributed.initialize(coordinator_address, num_processes, process_id)`` before anything else;
``jax.devices()`` then spans all hosts and the same mesh / sharded step applies (BUILD_NOTES.md).
"""

import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Quick preset (~1-2 min on 2 cores): the headline MAML comparison only.")
flags.DEFINE_list("sections", None, "Sections of the default preset to run (default: all): headline, data, "
                  "meta_batch, inner_steps, support, width, chunk, dtype. Empty = none (custom grid only).")
flags.DEFINE_list("learners", ["maml", "fomaml", "reptile", "metasgd", "imaml"], "Meta-learners for the headline/custom grid.")
flags.DEFINE_list("meta_batch", None, "Custom grid: meta-batch sizes (adds section 'custom').")
flags.DEFINE_list("support", None, "Custom grid: support set sizes.")
flags.DEFINE_list("inner_steps", None, "Custom grid: inner steps.")
flags.DEFINE_list("width", None, "Custom grid: hidden widths of the MeLU MLP.")
flags.DEFINE_list("modes", ["vmap", "map", "loop"], "Custom grid: execution modes (vmap, map, loop).")
flags.DEFINE_enum("data", "synthetic", ["synthetic", "ml-100k"], "Custom grid: task source.")
flags.DEFINE_integer("devices", 1, "Also benchmark the sharded step over this many devices (CPU: virtual devices).",
                     lower_bound=1)
flags.DEFINE_float("min_time", None, "Seconds of steady-state timing per measurement (preset default).", lower_bound=0.0)
flags.DEFINE_bool("profile", True, "Profile the headline and large vmapped steps with jax.profiler.")
flags.DEFINE_integer("seed", 0, "Seed for data, parameters and batch order.")
flags.DEFINE_bool("tune_malloc", False, "Restart under glibc malloc settings that keep XLA's per-step temporaries "
                  "mapped (metarec.hostmem.TUNED_ENV): ~30x fewer page faults per step, but no faster on the "
                  "2-core VM and lax.map 2-3x slower (one malloc arena; BUILD_NOTES.md), hence off by default.")
flags.DEFINE_string("workdir", "runs/benchmark", "Where benchmark.json and benchmark.txt go.")


def _ints(name):
    values = getattr(FLAGS, name)
    if values is None:
        return None
    try:
        out = [int(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--{name} takes a comma list of integers, got {','.join(values)!r}")
    if any(v < (0 if name == "inner_steps" else 1) for v in out):
        raise app.UsageError(f"--{name} values must be >= {0 if name == 'inner_steps' else 1}, got {out}")
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from metarec import hostmem

    if FLAGS.tune_malloc:
        hostmem.reexec_with_tuned_malloc()  # returns when already tuned (or not glibc)
    import jax

    if FLAGS.devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", FLAGS.devices)  # before the backend starts
    from metarec import bench

    if jax.device_count() < FLAGS.devices:
        raise app.UsageError(f"--devices={FLAGS.devices} but only {jax.device_count()} devices are visible "
                             f"({jax.default_backend()}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count")
    preset = "quick" if FLAGS.quick else "default"
    sections = bench.SECTIONS if FLAGS.sections is None else [s for s in FLAGS.sections if s]
    custom = {k: _ints(k) for k in ("meta_batch", "support", "inner_steps", "width")}
    custom = None if all(v is None for v in custom.values()) else custom | {"modes": FLAGS.modes, "data": FLAGS.data}
    try:
        grid, settings = bench.make_grid(preset, FLAGS.learners, sections, FLAGS.devices, custom)
    except ValueError as e:
        raise app.UsageError(str(e))
    if FLAGS.min_time is not None:
        settings.min_time = FLAGS.min_time
    settings.profile = FLAGS.profile
    settings.seed = FLAGS.seed
    command = " ".join([os.path.basename(sys.executable), "-m", "experiments.benchmark", *sys.argv[1:]])
    res = bench.run_benchmark(grid, settings, command=command, preset=preset,
                              log_fn=lambda m: print(m, flush=True))
    os.makedirs(FLAGS.workdir, exist_ok=True)
    path = os.path.join(FLAGS.workdir, "benchmark.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    report = bench.format_report(res)
    with open(os.path.join(FLAGS.workdir, "benchmark.txt"), "w") as f:
        f.write(report + "\n")
    print()
    print(report)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
