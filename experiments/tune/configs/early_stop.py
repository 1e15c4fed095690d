"""A tune stage's step after ``new_item_scale.py``: what early stopping minimises, at the point
the stage chose. Every searched field of that point (read from the file the stage wrote, the
new-item scale and genre kNN included) is fixed, and ``early_stop_ndcg_weight`` takes 0 (the
epoch with the lowest validation MAE, as every earlier trial stopped) and 1 (the lowest MAE -
nDCG@k: the objective's term on the same users, and the weight the step-scale calibration
uses). One trial per weight for cf_metasgd (each its own meta-training) and one per MeLU
learner at its chosen step size; the same stand-ins, seal and objective. Writes the file it
read, with the field added.

  python -m experiments.tune.main --workdir=runs/tune            # the melu search
  python -m experiments.tune.main --config=experiments/tune/configs/new_item_scale.py \\
      --workdir=runs/tune_new_scale
  python -m experiments.tune.main --config=experiments/tune/configs/early_stop.py \\
      --workdir=runs/tune_early_stop
  # the time protocol: after configs/time.py, time_tasks.py and new_item_scale.py:time
  python -m experiments.tune.main --config=experiments/tune/configs/early_stop.py:time \\
      --workdir=runs/tune_time_early_stop
"""

import ml_collections

from experiments.tune.configs.new_item_scale import chosen_point, grid_at, stage_config

FIELD = "early_stop_ndcg_weight"
WEIGHTS = (0.0, 1.0)


def get_config(stage: str = "melu") -> ml_collections.ConfigDict:
    c = stage_config("early_stop", stage)
    values = ",".join(str(float(w)) for w in WEIGHTS)
    # every searched field fixed, the last step's included
    return grid_at(c, chosen_point(c, leave=()), {FIELD: f"choice:{values}"})
