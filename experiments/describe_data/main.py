"""Print a dataset's cleaning counts and its cold-start scenario table.

  python -m experiments.describe_data.main [--config.dataset=ml-1m] [--config.protocol=time]
      [--config.seed=1] [--config.data_dir=<folder>] [--config.download]

With ``--workdir`` the libraries' INFO logs (e.g. the cleaning details) go to
``<workdir>/describe_data.log``; without it only their warnings reach the terminal.
"""

from absl import flags

from experiments import common
from experiments.describe_data import pipeline

FLAGS = flags.FLAGS
_CONFIG = common.define_config(__file__)
common.define_run_flags(default_workdir=None, resumable=False)


def _run() -> None:
    if FLAGS.workdir:
        common.prepare_workdir(FLAGS.workdir, "describe_data")
    else:
        common.quiet_terminal()
    pipeline.main(_CONFIG.value)


if __name__ == "__main__":
    common.run_main("describe_data", _run)
