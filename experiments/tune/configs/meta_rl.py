"""Model selection for the meta-RL experiment on validation simulator users (never test users):
writes ``experiments/meta_rl/configs/tuned.json``, which the meta-RL default config reads.

  python -m experiments.tune.main --config=experiments/tune/configs/meta_rl.py \
      --workdir=runs/tune_rl

``spaces`` maps each candidate method to its search space (the forms of
:mod:`experiments.tune.pipeline`, a section's fields as ``section/field``); the objective is minus
the mean validation CTR after ``episodes`` adaptation episodes; the recommended method is the
meta-learned one with the lowest. The bandits' own constants are tuned the same way (small grids),
so every method of the main run uses validation-chosen settings.
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
        # the meta-learned bandit: the initial precision of its user-vector prior (the
        # bandits' ridge lam; it is learned in log space, and 400 iterations move it little from
        # where it starts). Its trial length, discount, meta_lr, temperature and training
        # length (400 iterations; 800 scored no better) are the base config's, chosen by this
        # stage's earlier searches. extra_dims (learned directions beyond the recommender-side
        # factors) is a knob too; 8 scored below the base point on these validation users
        # (BUILD_NOTES) and is not searched
        "metabandit": {"metabandit/prior_precision": "choice:1.0,8.0,64.0"},
        # RL^2 (a GRU memory): evaluated at its configured point (one point: a training costs
        # minutes on the shared 2 cores)
        "rl2": {"rl2/meta_lr": "choice:0.01"},
        # the MAML family's inner step (one shared section; tuned with Meta-SGD): which parameters
        # adapt (the step size 1.0 and myopic credit are the base config's, chosen by the first
        # search)
        "metasgd": {"meta/inner_params": "choice:item_bias,user,all"},
        # the bandits' own constants, each tuned like the meta-learners (the classic values are
        # in each grid; the grids are wide because a bandit point costs seconds, and reach past
        # the largest ridge any bandit chose): ridge lam and the exploration constant
        "mf_greedy": {
            "bandits/mf_greedy/lam": "choice:0.25,0.5,1.0,2.0,4.0,8.0,16.0,64.0,256.0,1024.0"
        },
        "egreedy": {
            "bandits/egreedy/lam": "choice:0.25,1.0,4.0,16.0,64.0,256.0,1024.0",
            "bandits/egreedy/eps": "choice:0.01,0.02,0.05,0.1,0.2",
        },
        "linucb": {
            "bandits/linucb/lam": "choice:0.25,1.0,4.0,16.0,64.0,256.0,1024.0",
            "bandits/linucb/alpha": "choice:0.03,0.1,0.25,0.5,1.0",
        },
        "thompson": {
            "bandits/thompson/lam": "choice:0.25,1.0,4.0,16.0,64.0,256.0,1024.0",
            "bandits/thompson/ts": "choice:0.03,0.1,0.25,0.5,1.0",
        },
    }
    # read against: the bandits without constants of their own, and the oracle
    c.references = ("random", "popular")
    c.write_config = os.path.join(os.path.dirname(meta_rl.__file__), "tuned.json")
    c.base = meta_rl.base_config()
    c.base.online_rounds = 0
    return c
