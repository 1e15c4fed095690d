"""Choose the defaults on validation users (never on test scenarios or test users).

  python -m experiments.tune.main --workdir=runs/tune     # writes coldstart/configs/tuned.json
  python -m experiments.tune.main --config.spaces={} --config.algo=maml --workdir=runs/grid
  python -m experiments.tune.main --config=experiments/tune/configs/meta_rl.py \
      --workdir=runs/tune_rl                               # writes meta_rl/configs/tuned.json

The first searches every method of --config.spaces with optuna and names the recommended method;
the second is a grid search of --config.grid. Both write tune.json (trials best first) to --workdir.
"""

import sys

from absl import flags

from experiments import common
from experiments.tune import meta_rl, pipeline

FLAGS = flags.FLAGS
_CONFIG = common.define_config(__file__)
common.define_run_flags(default_workdir="runs/tune", resumable=False)


def _main():
    cfg = _CONFIG.value
    stage = meta_rl if cfg.get("experiment") == "meta_rl" else pipeline
    return stage.main(cfg, FLAGS.workdir, argv=sys.argv)


if __name__ == "__main__":
    common.run_main("tune", _main)
