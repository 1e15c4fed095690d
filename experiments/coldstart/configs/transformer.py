"""Meta-learning on a Transformer history encoder, pretrained per seed by ``experiments.pretrain``.

Pretrain each seed, then run this config:

  python -m experiments.pretrain.main --config.seed=0 --workdir=runs/pretrain/seed0
  python -m experiments.coldstart.main --config=experiments/coldstart/configs/transformer.py
"""

from experiments.coldstart.configs import default


def get_config():
    c = default.get_config()
    c.model = "transformer"
    c.adapt = "head"
    c.init_from = "runs/pretrain/seed{seed}"
    return c
