"""A tune stage's last step: the step scale of new items (``new_item_step_scale``) at the point
the stage chose. Every searched field of that point (read from the file the stage wrote) is fixed
(a one-value choice), and ``new_item_step_scale`` takes -1 (new items at the scale the
validation users choose for every item, as before this step) and each scale of ``step_scales``,
so the stage is a grid of one trial per value (and one per MeLU learner, at its chosen step
size); the same stand-ins, seal and objective. Only the new-item stand-in's predictions differ
between the trials, so its users make the choice. Writes the file it read, with the scale added.

  python -m experiments.tune.main --workdir=runs/tune            # the melu search
  python -m experiments.tune.main --config=experiments/tune/configs/new_item_scale.py \\
      --workdir=runs/tune_new_scale
  # the time protocol: after configs/time.py and configs/time_tasks.py
  python -m experiments.tune.main --config=experiments/tune/configs/new_item_scale.py:time \\
      --workdir=runs/tune_time_new_scale
"""

import json

import ml_collections

from experiments.tune.configs import default, time
from experiments.tune.spaces import point_spaces

FIELD = "new_item_step_scale"
STAGES = {"melu": default, "time": time}


def chosen_point(c: ml_collections.ConfigDict) -> dict[str, dict]:
    """The searched fields of each method of ``c.spaces``, as the stage's file has them."""
    with open(c.write_config) as f:
        methods = json.load(f)["methods"]
    return {m: {f: methods[m][f] for f in space if f != FIELD} for m, space in c.spaces.items()}


def get_config(stage: str = "melu") -> ml_collections.ConfigDict:
    if stage not in STAGES:
        raise ValueError(f"--config=...new_item_scale.py:{stage}; allowed: {', '.join(STAGES)}")
    c = STAGES[stage].get_config()
    values = ",".join(str(float(v)) for v in (-1.0, *c.base.step_scales))
    c.spaces = point_spaces(chosen_point(c), {"cf_metasgd": {FIELD: f"choice:{values}"}})
    c.warm_starts = {}  # a grid tries every point
    return c
