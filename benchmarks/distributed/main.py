"""Launcher: meta-training on several processes with JAX's distributed runtime, one process per
host (or per GPU), each feeding its rows of every meta-batch to the same jitted meta-step.

  # two processes on this machine (CPU, gloo collectives), one shell each:
  python -m benchmarks.distributed.main --coordinator_address=localhost:12355 \\
      --num_processes=2 --process_id=0 --workdir=/tmp/dist
  python -m benchmarks.distributed.main --coordinator_address=localhost:12355 \\
      --num_processes=2 --process_id=1
  # one process over the whole meta-batch (the reference):
  python -m benchmarks.distributed.main --workdir=/tmp/single
  # under SLURM, one task per GPU: JAX reads the layout itself (process id SLURM_PROCID, the
  # coordinator on the first node, the task's GPU SLURM_LOCALID); one task per node with all its
  # GPUs needs the three flags above instead (auto-detection would give each task GPU 0 only)
  srun python -m benchmarks.distributed.main --auto_detect --workdir=runs/dist
  # the library's meta_train (epochs, validation, early stopping, checkpoints in --workdir/ckpt,
  # which every process needs): the same flags on every process but --process_id; --resume
  # continues from the checkpoints; --dataset=ml-100k trains the cold-start experiment's model
  python -m benchmarks.distributed.main --loop=meta_train --epochs=2 --steps=2 \\
      --coordinator_address=localhost:12355 --num_processes=2 --process_id=0 --workdir=/tmp/mt

Process 0 writes ``distributed.json`` (setup, losses, step seconds, processes and devices; with
``--loop=meta_train`` the history, best epoch and validation MAE, steps, seconds) and
``params.npz`` (the final meta-parameters; meta_train: the best ones) to --workdir.
"""

import json
import os

import jax
import numpy as np
from absl import flags

from benchmarks.distributed.run import Setup, Stopped, train, train_meta
from experiments import common
from metarec.meta.step import make_mesh
from metarec.training import distributed

FLAGS = flags.FLAGS
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (all processes).")
flags.DEFINE_integer("num_processes", None, "Number of processes in the job.", lower_bound=1)
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1.")
flags.DEFINE_bool(
    "auto_detect", False, "Let JAX read the layout from SLURM / Open MPI / a TPU pod."
)
flags.DEFINE_string("cpu_collectives", "gloo", "Cross-process collectives on CPU: gloo or mpi.")
for _f in Setup.__dataclass_fields__.values():
    if _f.type == "str":
        flags.DEFINE_string(_f.name, _f.default, f"Setup.{_f.name}.")
    else:
        flags.DEFINE_integer(_f.name, _f.default, f"Setup.{_f.name}.")
common.define_run_flags(None, resumable=False)
flags.DEFINE_bool("resume", False, "--loop=meta_train: continue from the checkpoints in --workdir.")
flags.DEFINE_integer(
    "stop_after_steps", 0, "--loop=meta_train: stop before this meta-step + 1 (resume checks)."
)


def main() -> None:
    explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.auto_detect or any(v is not None for v in explicit):
        distributed.initialize(*explicit, cpu_collectives=FLAGS.cpu_collectives)
    setup = Setup(**{k: getattr(FLAGS, k) for k in Setup.__dataclass_fields__})
    mesh = make_mesh() if jax.process_count() > 1 else None
    if setup.loop == "meta_train":
        _meta_train(setup, mesh)
        return
    res = train(setup, mesh)
    print(
        f"process {jax.process_index()}/{jax.process_count()}: {setup.steps} steps, "
        f"losses {' '.join(f'{v:.4f}' for v in res['losses'])}, first step "
        f"{res['first_step_s']:.1f}s, others {res['other_steps_s']:.2f}s",
        flush=True,
    )
    _write(res, setup)


def _write(res: dict, setup: Setup) -> None:
    """Process 0 writes the best parameters (``params.npz``) and the rest (``distributed.json``)."""
    if FLAGS.workdir and jax.process_index() == 0:
        os.makedirs(FLAGS.workdir, exist_ok=True)
        np.savez(os.path.join(FLAGS.workdir, "params.npz"), **res.pop("params"))
        info = res | {
            "setup": vars(setup),
            "process_count": jax.process_count(),
            "devices": [str(d) for d in jax.devices()],
        }
        with open(os.path.join(FLAGS.workdir, "distributed.json"), "w") as f:
            json.dump(info, f, indent=1)


def _meta_train(setup: Setup, mesh) -> None:
    who = f"process {jax.process_index()}/{jax.process_count()}"
    try:
        res = train_meta(
            setup,
            mesh,
            workdir=FLAGS.workdir,
            resume=FLAGS.resume,
            stop_after_steps=FLAGS.stop_after_steps,
            log_fn=lambda line: print(f"{who}: {line.strip()}", flush=True),
        )
    except Stopped as e:
        print(f"{who}: {e}", flush=True)
        return
    print(
        f"{who}: meta_train {res['steps']} steps, best epoch {res['best_epoch']}, val MAE "
        f"{res['best_val_mae']:.4f}, {res['seconds']:.1f}s"
        + ("" if res["rows_read"] is None else f", read {res['rows_read']} task rows"),
        flush=True,
    )
    _write(res, setup)


if __name__ == "__main__":
    common.run_main("distributed", main)
