"""A tune stage's last step: how new items are predicted, at the point the stage chose. Every
searched field of that point (read from the file the stage wrote) is fixed (a one-value choice),
and ``new_item_step_scale`` takes -1 (new items at the scale the validation users choose for
every item, as before this step) and each scale of ``step_scales``; where the point has the kNN
blend (``cf_knn``), ``cf_knn_new_content`` takes False and True (new items' item-kNN feature: the
support mean, or a genre kNN over the support), and where its new items have no blend of their
own, ``cf_knn_new_own`` takes False and True too, since the genre kNN needs that blend (with it
False the two content values are the same model). The stage is a grid of one trial per
combination (and one per MeLU learner, at its chosen step size); the same stand-ins, seal and
objective. Trials that differ only in the scale share one meta-training
(``pipeline.AFTER_TRAINING``). Writes the file it read, with the fields added.

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
CONTENT = "cf_knn_new_content"  # gridded where the point has cf_knn
OWN = "cf_knn_new_own"  # gridded where the point has cf_knn but not this
STAGES = {"melu": default, "time": time}


def chosen_point(c: ml_collections.ConfigDict, leave=(FIELD, CONTENT), also=()) -> dict[str, dict]:
    """The searched fields of each method of ``c.spaces`` but ``leave``, plus those of ``also``
    (fields an earlier step added) that a method's entry has, as the stage's file has them."""
    with open(c.write_config) as f:
        methods = json.load(f)["methods"]
    return {
        m: {f: methods[m][f] for f in space if f not in leave}
        | {f: methods[m][f] for f in also if f in methods[m]}
        for m, space in c.spaces.items()
    }


def stage_config(step: str, stage: str) -> ml_collections.ConfigDict:
    """The config of ``stage``'s search, which the step ``step`` (its file name) runs after; an
    unknown stage is one error line."""
    if stage not in STAGES:
        raise ValueError(f"--config=...{step}.py:{stage}; allowed: {', '.join(STAGES)}")
    return STAGES[stage].get_config()


def grid_at(c: ml_collections.ConfigDict, point: dict, grid: dict) -> ml_collections.ConfigDict:
    """``c`` searching a grid: ``point`` fixed but cf_metasgd's fields of ``grid`` (field ->
    space entry)."""
    c.spaces = point_spaces(point, {"cf_metasgd": grid})
    c.warm_starts = {}  # a grid tries every point
    return c


def get_config(stage: str = "melu") -> ml_collections.ConfigDict:
    c = stage_config("new_item_scale", stage)
    values = ",".join(str(float(v)) for v in (-1.0, *c.base.step_scales))
    point = chosen_point(c)
    grid = {FIELD: f"choice:{values}"}
    if point["cf_metasgd"].get("cf_knn", False):
        grid[CONTENT] = "choice:False,True"
        if not point["cf_metasgd"].get(OWN, False):
            grid[OWN] = "choice:False,True"
    return grid_at(c, point, grid)
