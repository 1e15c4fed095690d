"""Large-model comparison on the cold-start protocol: MeLU + MAML vs a Transformer rater from
scratch + MAML, pretrained + fine-tuning and pretrained + MAML; plus next-item ranking of the
pretrained encoder vs popularity. Writes ``results.json`` to --workdir.

  python -m experiments.large_model.main --workdir=runs/large_model
  python -m experiments.large_model.main --config.seeds=0,1,2 --config.init_from=runs/pt/seed{seed}
  python -m experiments.large_model.main --config.methods=melu_maml,tf_pre_maml --config.epochs=2
"""

from absl import flags

from experiments import common
from experiments.large_model import pipeline

FLAGS = flags.FLAGS
_CONFIG = common.define_config(__file__)
common.define_run_flags(default_workdir="runs/large_model", resumable=False)


def _main():
    pipeline.main(_CONFIG.value, FLAGS.workdir)


if __name__ == "__main__":
    common.run_main(pipeline.NAME, _main)
