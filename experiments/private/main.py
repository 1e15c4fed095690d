"""User-level differentially private meta-training: the privacy-utility table and curve.

  python -m experiments.private.main --workdir=runs/private
  python -m experiments.private.main --workdir=runs/private --resume   # continue a killed run
  python -m experiments.private.main --config=experiments/private/configs/quick.py --workdir=/tmp/p

Any config field can be overridden, e.g. ``--config.epsilons=1,8,inf --config.seeds=0
--config.l2_clip=1.0 --config.meta_lr=0.01`` (fixed values skip the selection grid).
"""

from absl import flags

from experiments import common
from experiments.private import pipeline

FLAGS = flags.FLAGS
_CONFIG = common.define_config(__file__)
common.define_run_flags(default_workdir="runs/private")


if __name__ == "__main__":
    common.run_resumable("private", "experiments.private.main", pipeline.main, _CONFIG)
