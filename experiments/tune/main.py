"""Choose hyper-parameters on validation users (never on test scenarios): one learner's grid search.

  python -m experiments.tune.main --config.algo=maml --workdir=runs/tune
  python -m experiments.tune.main --config.grid.inner_lr='(0.05, 0.3)' --config.base.epochs=10

Writes tune.json (rows sorted by validation MAE, best first) into --workdir.
"""

from absl import flags

from experiments import common
from experiments.tune import pipeline

FLAGS = flags.FLAGS
_CONFIG = common.define_config(__file__)
common.define_run_flags(default_workdir="runs/tune", resumable=False)

if __name__ == "__main__":
    common.run_main("tune", lambda: pipeline.main(_CONFIG.value, FLAGS.workdir))
