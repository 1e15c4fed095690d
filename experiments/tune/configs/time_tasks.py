"""The time stage's second step: its meta-training task modes compared at the point its search
chose (``experiments/tune/configs/time.py``, whose TPE sampler tried the chronological mode
once, far from its best region). Every field of that point is fixed (a one-value choice) except
``train_tasks``, which takes each of the search's modes, so the stage is a grid of one trial per
mode (and one per MeLU learner, at its chosen step size); the same stand-ins, seal and
objective; writes ``experiments/coldstart/configs/tuned_time.json``.

  python -m experiments.tune.main --config=experiments/tune/configs/time.py --workdir=runs/tune_time
  python -m experiments.tune.main --config=experiments/tune/configs/time_tasks.py \\
      --workdir=runs/tune_time_tasks
"""

import ml_collections

from experiments.tune.configs import time
from experiments.tune.spaces import point_spaces

# the time search's choice (trial 1, its warm start, of the search run in a worktree of 41e319e,
# which kept the committed point)
SEARCH_POINT = {
    "cf_metasgd": {
        "cf_dim": 8,
        "cf_knn": True,
        "cf_knn_mf": False,
        "cf_knn_new_content": False,
        "cf_knn_new_items": False,
        "cf_knn_new_own": True,
        "cf_melu": False,
        "cf_new_item_mean": 0.40358224694637557,
        "cf_reg": 10.963151789119598,
        "cf_user_fields": 3,
        "id_dropout": 0.5806039939083947,
        "inner_lr": 0.20948062967627523,
        "inner_newton": 4.710320953576413,
        "meta_lr": 0.0018957920763988728,
        "new_item_step_scale": 0.0,
        "outer_rank_weight": 0.28327633446926426,
        "train_tasks": "crossfit",
    },
    "maml": {"inner_lr": 0.01},
    "metasgd": {"inner_lr": 0.01},
}
GRID_FIELD = "train_tasks"  # the one field of cf_metasgd that keeps the search's choices


def get_config() -> ml_collections.ConfigDict:
    c = time.get_config()
    free = {"cf_metasgd": {GRID_FIELD: c.spaces["cf_metasgd"][GRID_FIELD]}}
    c.spaces = point_spaces(SEARCH_POINT, free)
    c.warm_starts = {}  # a grid tries every point
    return c
