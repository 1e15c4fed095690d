"""Model selection for the meta-RL experiment on validation simulator users (never test users):
writes ``experiments/meta_rl/configs/tuned.json``, which the meta-RL default config reads.

  python -m experiments.tune.main --config=experiments/tune/configs/meta_rl.py \
      --workdir=runs/tune_rl

``spaces`` maps each candidate method to its search space (the forms of
:mod:`experiments.tune.pipeline`, a section's fields as ``section/field``); the objective is minus
the mean validation CTR after ``episodes`` adaptation episodes; the recommended method has the
lowest.
"""

import os

import ml_collections

from experiments.meta_rl.configs import default as meta_rl


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "meta_rl"
    c.seeds = (0, 1, 2)  # seeds whose validation users are averaged
    c.n_trials = 6  # per method (a space of choices only is searched as a grid)
    c.sampler_seed = 0
    c.episodes = (1, 2, 5, 10)  # the numbers of adaptation episodes the objective averages
    c.spaces = {
        # the meta-learned bandit: its meta-training (the initial values are the bandit's)
        "metabandit": {
            "metabandit/meta_lr": "log:0.002:0.03",
            "metabandit/temperature": "log:0.01:0.2",
            "metabandit/trial_episodes": "choice:2,4,8",
            "metabandit/gamma": "float:0.5:1.0",
        },
        # the MAML family's inner step (one shared section; tuned with Meta-SGD)
        "metasgd": {
            "meta/inner_lr": "choice:1.0,3.0,10.0",
            "meta/inner_credit": "choice:myopic,causal",
        },
    }
    # read against (untuned): the bandits and the oracle
    c.references = ("mf_greedy", "egreedy", "linucb", "thompson")
    c.write_config = os.path.join(os.path.dirname(meta_rl.__file__), "tuned.json")
    c.base = meta_rl.base_config()
    c.base.online_rounds = 0
    return c
