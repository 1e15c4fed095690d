"""Model selection for the slate meta-RL experiment (``experiments/meta_rl/configs/slate.py``) on
validation simulator users: the single-item stage's spaces and objective (minus the mean
validation clicks per slate), on the slate simulator; writes
``experiments/meta_rl/configs/tuned_slate.json``.

  python -m experiments.tune.main --config=experiments/tune/configs/meta_rl_slate.py \
      --workdir=runs/tune_rl_slate
"""

import ml_collections

from experiments.meta_rl.configs import slate
from experiments.tune.configs import meta_rl


def get_config() -> ml_collections.ConfigDict:
    c = meta_rl.get_config()
    c.write_config = slate.TUNED
    c.base = slate.base_config()
    c.base.online_rounds = 0
    return c
