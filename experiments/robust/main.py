"""Robust meta-learning: standard vs adversarially meta-trained cf_metasgd under embedding attacks
(FGSM/PGD at several budgets) and profile injection, on ml-100k seeds 0, 1, 2.

  python -m experiments.robust.main --workdir=runs/robust
  python -m experiments.robust.main --workdir=runs/robust --resume
  python -m experiments.robust.main --config=experiments/robust/configs/quick.py --workdir=/tmp/r

Writes results.json, results.md, report/robust_attack.png, per-unit files under units/ and
checkpoints/ (see pipeline.py).
"""

from absl import flags

from experiments import common
from experiments.robust import pipeline

FLAGS = flags.FLAGS
_CONFIG = common.define_config(__file__)
common.define_run_flags(default_workdir="runs/robust")


if __name__ == "__main__":
    common.run_resumable("robust", "experiments.robust.main", pipeline.main, _CONFIG)
