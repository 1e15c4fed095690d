"""Write a run's Markdown report with PNG figures and print its path.

  python -m experiments.report.main --workdir=runs/demo   # -> runs/demo/report/report.md

``--workdir`` is a finished run's folder holding ``results.json`` and/or ``rl_results.json``.
"""

from absl import flags

from experiments import common
from experiments.report import report

FLAGS = flags.FLAGS
common.define_run_flags(default_workdir=None, resumable=False)
flags.DEFINE_string("out_dir", None, "Where to write the report (default <workdir>/report).")


def _run() -> None:
    if not FLAGS.workdir:
        raise ValueError("--workdir is required: the folder of a finished run")
    common.quiet_terminal()
    print(report.make_report(FLAGS.workdir, FLAGS.out_dir))


if __name__ == "__main__":
    common.run_main("report", _run)
