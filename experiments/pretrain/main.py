"""Masked-item pretraining of the history Transformer on the training users of one split.

  python -m experiments.pretrain.main --config.seed=0 --workdir=runs/pretrain/seed0
  python -m experiments.pretrain.main --config.seed=0 --workdir=runs/pretrain/seed0 --resume
  python -m experiments.pretrain.main --config.pretrain.epochs=2 --config.encoder.width=32 ...

The checkpoint in --workdir is what ``--config.init_from`` of the cold-start and large-model
experiments loads (pretrain once per split seed). What the workdir holds: see ``pipeline.py``.
"""

from absl import flags

from experiments import common
from experiments.pretrain import pipeline

FLAGS = flags.FLAGS
_CONFIG = common.define_config(__file__)
common.define_run_flags(default_workdir="runs/pretrain")


if __name__ == "__main__":
    common.run_resumable(pipeline.NAME, "experiments.pretrain.main", pipeline.main, _CONFIG)
