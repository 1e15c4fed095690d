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

# the time search's choice: its warm start, the committed point (trial 1 of the search run in a
# worktree of 588d8ea, with the validation users held out of the fit; so it was in 41e319e)
SEARCH_POINT = {
    "cf_metasgd": time.get_config().warm_starts.cf_metasgd.to_dict(),
    "maml": {"inner_lr": 0.01},
    "metasgd": {"inner_lr": 0.05},
}
GRID_FIELD = "train_tasks"  # the one field of cf_metasgd that keeps the search's choices


def get_config() -> ml_collections.ConfigDict:
    c = time.get_config()
    free = {"cf_metasgd": {GRID_FIELD: c.spaces["cf_metasgd"][GRID_FIELD]}}
    c.spaces = point_spaces(SEARCH_POINT, free)
    c.warm_starts = {}  # a grid tries every point
    return c
