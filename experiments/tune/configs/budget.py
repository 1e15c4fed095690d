"""A tune stage's step after ``early_stop.py``: cf_metasgd's training budget, at the point the
stage chose. Every searched field of that point (read from the file the stage wrote, the earlier
steps' fields included) is fixed, and cf_metasgd's ``epochs`` and ``patience`` take each pair of
{20, 30} x {4, 8}, the base config's 20 / 4 among them: early stopping on a few dozen validation
users per seed is noisy at patience 4, and the cap binds where a seed still improves. One trial
per pair for cf_metasgd (each its own meta-training) and one per MeLU learner, whose budget stays
the base config's; the same stand-ins, seal and objective. Writes the file it read, with the
fields added to cf_metasgd's entry (a per-method override of the base budget).

  # the time protocol: after configs/time.py, time_tasks.py, new_item_scale.py:time and
  # early_stop.py:time
  python -m experiments.tune.main --config=experiments/tune/configs/budget.py:time \\
      --workdir=runs/tune_time_budget
"""

import ml_collections

from experiments.tune.configs import early_stop
from experiments.tune.configs.new_item_scale import chosen_point, grid_at, stage_config

EPOCHS = (20, 30)
PATIENCE = (4, 8)


def get_config(stage: str = "time") -> ml_collections.ConfigDict:
    c = stage_config("budget", stage)
    grid = {
        "epochs": "choice:" + ",".join(map(str, EPOCHS)),
        "patience": "choice:" + ",".join(map(str, PATIENCE)),
    }
    return grid_at(c, chosen_point(c, leave=(), also=(early_stop.FIELD,)), grid)
