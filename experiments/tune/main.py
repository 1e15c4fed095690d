"""Choose the cold-start defaults on validation users (never on test scenarios).

  python -m experiments.tune.main --workdir=runs/tune     # writes configs/tuned.json
  python -m experiments.tune.main --config.spaces={} --config.algo=maml --workdir=runs/grid

The first searches every method of --config.spaces with optuna and names the recommended method;
the second is a grid search of --config.grid. Both write tune.json (trials best first) to --workdir.
"""

import sys

from absl import flags

from experiments import common
from experiments.tune import pipeline

FLAGS = flags.FLAGS
_CONFIG = common.define_config(__file__)
common.define_run_flags(default_workdir="runs/tune", resumable=False)

if __name__ == "__main__":
    common.run_main("tune", lambda: pipeline.main(_CONFIG.value, FLAGS.workdir, argv=sys.argv))
