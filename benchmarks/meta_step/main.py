"""Benchmark of the vmapped meta-step against a per-task Python loop and ``lax.map``; prints
tables and writes ``benchmark.json`` (keys: ``harness.TOP_KEYS``) and ``benchmark.txt`` to
--workdir.

  python -m benchmarks.meta_step.main --quick --workdir=/tmp/bench_quick     # ~1-2 min, 2 cores
  python -m benchmarks.meta_step.main --workdir=runs/bench                   # ~10 min, 2 cores
  python -m benchmarks.meta_step.main --sections=headline --learners=maml,fomaml --workdir=/tmp/b
  python -m benchmarks.meta_step.main --sections= --meta_batch=32,128 --inner_steps=1,5 \\
      --modes=vmap,loop
  python -m benchmarks.meta_step.main --quick --devices=4 --workdir=/tmp/b4  # 4 CPU devices
  python -m benchmarks.meta_step.main --preset=gpu --workdir=runs/bench_gpu   # ~3 min, one H200

--devices=N on CPU splits the host into N XLA devices (``jax_num_cpu_devices``, equivalent to
XLA_FLAGS=--xla_force_host_platform_device_count=N): the sharded step, checked against the
single-device meta-gradient; on a 2-core CPU, 2 devices keep both cores busy on the small dots
(section ``ceiling`` times and bounds them that way). On several hosts, run one process per
host, each calling ``jax.distributed.initialize(coordinator_address, num_processes,
process_id)`` before anything else; ``jax.devices()`` then spans all hosts and the same mesh /
sharded step applies.
"""

import json
import os
import sys

import jax
from absl import flags

from benchmarks.meta_step import config as bconfig
from benchmarks.meta_step import harness, report
from experiments import common
from metarec import meta

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Quick preset (~1-2 min on 2 cores): the headline MAML only.")
flags.DEFINE_enum(
    "preset",
    None,
    list(bconfig.PRESETS),
    "Preset (default: 'quick' with --quick, else 'default'); 'gpu': the headline in all three "
    "executions, meta-batch scaling to the memory limit, remat, bf16 (~3 min on one H200).",
)
flags.DEFINE_list(
    "sections",
    None,
    f"Sections of the default preset to run (default: all): {', '.join(bconfig.SECTIONS)}. "
    "Empty = none (custom grid only).",
)
flags.DEFINE_list("learners", list(meta.LEARNERS), "Meta-learners for the headline/custom grid.")
flags.DEFINE_list("meta_batch", None, "Custom grid: meta-batch sizes (adds section 'custom').")
flags.DEFINE_list("support", None, "Custom grid: support set sizes.")
flags.DEFINE_list("inner_steps", None, "Custom grid: inner steps.")
flags.DEFINE_list("width", None, "Custom grid: hidden widths of the MeLU MLP.")
flags.DEFINE_list("modes", ["vmap", "map", "loop"], "Custom grid: execution modes.")
flags.DEFINE_enum("data", "synthetic", list(bconfig.DATA_SOURCES), "Custom grid: task source.")
flags.DEFINE_integer(
    "devices",
    1,
    "Also benchmark the sharded step over this many devices (CPU: virtual devices).",
    lower_bound=1,
)
flags.DEFINE_float(
    "min_time",
    None,
    "Seconds of steady-state timing per measurement (preset default).",
    lower_bound=0.0,
)
flags.DEFINE_bool(
    "profile",
    None,
    "Profile the headline and large vmapped steps (default: the preset's; the CPU presets do, "
    "the gpu preset does not: the profile reads CPU traces).",
)
flags.DEFINE_list(
    "memory_steps",
    None,
    "Inner-step counts of the memory-vs-inner-steps section (default: the preset's; empty: skip).",
)
flags.DEFINE_integer("seed", 0, "Seed for data, parameters and batch order.")
common.define_run_flags("runs/benchmark", resumable=False)


def _ints(name: str) -> list[int] | None:
    values = getattr(FLAGS, name)
    if values is None:
        return None
    try:
        out = [int(v) for v in values]
    except ValueError:
        msg = f"--{name} takes a comma list of integers, got {','.join(values)!r}"
        raise ValueError(msg) from None
    lo = 0 if name == "inner_steps" else 1
    if any(v < lo for v in out):
        raise ValueError(f"--{name} values must be >= {lo}, got {out}")
    return out


def main() -> None:
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if FLAGS.devices > 1 and "xla_force_host_platform_device_count" not in xla_flags:
        jax.config.update("jax_num_cpu_devices", FLAGS.devices)  # before the backend starts
    preset = FLAGS.preset or ("quick" if FLAGS.quick else "default")
    if FLAGS.quick and preset != "quick":
        raise ValueError(f"--quick and --preset={preset} disagree; pass one of them")
    sections = bconfig.SECTIONS if FLAGS.sections is None else [s for s in FLAGS.sections if s]
    custom = {k: _ints(k) for k in ("meta_batch", "support", "inner_steps", "width")}
    if all(v is None for v in custom.values()):
        custom = None
    else:
        custom |= {"modes": FLAGS.modes, "data": FLAGS.data}
    grid, settings = bconfig.make_grid(preset, FLAGS.learners, sections, FLAGS.devices, custom)
    if FLAGS.min_time is not None:
        settings.min_time = FLAGS.min_time
    if FLAGS.profile is not None:
        settings.profile = FLAGS.profile
    if FLAGS.memory_steps is not None:
        settings.memory_steps = tuple(_ints("memory_steps") or ())
    settings.seed = FLAGS.seed
    workdir = common.prepare_workdir(FLAGS.workdir, "benchmark")
    if jax.device_count() < FLAGS.devices:
        raise ValueError(
            f"--devices={FLAGS.devices} but only {jax.device_count()} devices are visible "
            f"({jax.default_backend()}); on CPU set "
            "XLA_FLAGS=--xla_force_host_platform_device_count"
        )
    module = "benchmarks.meta_step.main"
    command = " ".join([os.path.basename(sys.executable), "-m", module, *sys.argv[1:]])
    res = harness.run_benchmark(
        grid, settings, command=command, preset=preset, log_fn=lambda m: print(m, flush=True)
    )
    path = os.path.join(workdir, "benchmark.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    text = report.format_report(res)
    with open(os.path.join(workdir, "benchmark.txt"), "w") as f:
        f.write(text + "\n")
    print()
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    common.run_main("benchmark", main)
