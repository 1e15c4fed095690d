"""Meta-RL with slates: every step shows a ranked list of 5 items (cascade click model with
position bias, no repeats; :mod:`metarec.rl.env`) and the results gain the slate nDCG.

The simulator is the default one; 10 slates of 5 per episode show half of the 100-item catalogue
(20 single items per episode in the default). The tuned fields come from ``tuned_slate.json``,
written by the tune stage on validation users with slates
(``python -m experiments.tune.main --config=experiments/tune/configs/meta_rl_slate.py``). DQN ranks
single items only and is left out.

  python -m experiments.meta_rl.main --config=experiments/meta_rl/configs/slate.py \
      --workdir=runs/rl_slate
"""

import os

from experiments.meta_rl.configs import default
from experiments.meta_rl.settings import NOT_SLATE_AWARE

TUNED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_slate.json")


def base_config():
    """The default base config with slates: what the slate tune stage searches from."""
    c = default.base_config()
    c.env.slate_size = 5
    c.env.examine_decay = 0.8  # after a skipped item the user looks at the next one w.p. 0.8
    c.env.horizon = 10
    c.methods = tuple(m for m in c.methods if m not in NOT_SLATE_AWARE)
    return c


def get_config():
    return default.apply_tuned(base_config(), TUNED)
