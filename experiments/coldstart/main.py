"""Cold-start meta-learning on MovieLens: meta-train on warm users, evaluate every method on every
scenario over several seeds, print one table and write ``results.json`` (PROTOCOL.md) to --workdir.

  python -m experiments.coldstart.main --workdir=runs/demo
  python -m experiments.coldstart.main --config=experiments/coldstart/configs/quick.py \
      --workdir=/tmp/q
  python -m experiments.coldstart.main --config.algos=maml,metasgd --config.seeds=0 --workdir=/tmp/a
  python -m experiments.coldstart.main --workdir=runs/demo --resume   # continue an interrupted run

The workdir also gets per-(seed, learner) checkpoints and results (``checkpoints/``, ``units/``),
``metrics.jsonl``/``metrics.csv``, ``config.json``, ``run.json`` (command, package versions,
devices, git commit), ``train_log.txt``, ``coldstart.INFO`` (library logs) and ``report/report.md``.
"""

from absl import flags

from experiments import common
from experiments.coldstart import pipeline

FLAGS = flags.FLAGS
_CONFIG = common.define_config(__file__)
common.define_run_flags(default_workdir="runs/coldstart")


if __name__ == "__main__":
    common.run_resumable("coldstart", "experiments.coldstart.main", pipeline.main, _CONFIG)
