"""A tune stage's step after ``budget.py``: the MF baseline's fold-in as a blended feature of
cf_metasgd (``cf_knn_mf``), off and on, at the point the stage chose. Every searched field of that
point (read from the file the stage wrote, the earlier steps' fields included: the early-stopping
weight and cf_metasgd's own budget) is fixed but ``cf_knn_mf``. Why: on the time stage's cold-user
stand-in the chosen point (no MF feature) has a validation MAE above the MF baseline's, a gap the
feature addresses directly. Two trials for cf_metasgd (each its own meta-training) and one per
MeLU learner; the same stand-ins, seal and objective. Writes the file it read.

  # the time protocol: after configs/time.py, time_tasks.py, new_item_scale.py:time,
  # early_stop.py:time and budget.py:time
  python -m experiments.tune.main --config=experiments/tune/configs/mf_feature.py:time \\
      --workdir=runs/tune_time_mf_feature
"""

import ml_collections

from experiments.tune.configs import early_stop
from experiments.tune.configs.new_item_scale import chosen_point, grid_at, stage_config

FIELD = "cf_knn_mf"
# fields earlier steps added outside the search space, fixed as the stage's file has them
EARLIER = (early_stop.FIELD, "epochs", "patience")


def get_config(stage: str = "time") -> ml_collections.ConfigDict:
    c = stage_config("mf_feature", stage)
    point = chosen_point(c, leave=(FIELD,), also=EARLIER)
    return grid_at(c, point, {FIELD: "choice:False,True"})
