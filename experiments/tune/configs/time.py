"""Model selection for the "time" protocol (``experiments/coldstart/configs/time.py``) on that
protocol's validation users: the melu stage's spaces (plus meta-training tasks shaped as this
protocol's, ``train_tasks="crossfit_chrono"``), objective and trial budget, on the time
protocol's split, with stand-ins that hold out the newest whole release years and the latest
users, each trial scored on two models per seed as in the melu stage; writes
``experiments/coldstart/configs/tuned_time.json``.

  python -m experiments.tune.main --config=experiments/tune/configs/time.py --workdir=runs/tune_time
"""

import ml_collections

from experiments.coldstart.configs import time
from experiments.tune.configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.base.protocol = "time"  # the melu stage's base (shorter trials, cold-user stand-in) on time
    # stand-ins shifted as the time protocol's test scenarios are: the newest known items and the
    # latest-arriving training users are held out (declared after its first table, BUILD_NOTES)
    c.base.val_hold_out = "latest"  # the items held out are whole years (the melu stage's base)
    c.write_config = time.TUNED
    # meta-training tasks may also be shaped as this protocol's (query = the ratings right after
    # the support in time), cross-fitted (declared in BUILD_NOTES before the stage ran with it)
    c.spaces["cf_metasgd"]["train_tasks"] = "choice:resample_support,crossfit,crossfit_chrono"
    # tried right after the configured point: the committed choice (trial 11 of the search that
    # wrote tuned_time.json in d211905, then its steps, time_tasks.py and new_item_scale.py in
    # 71ca8e0), so a stage never ends worse on its objective than the point it replaces
    c.warm_starts = {
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
        }
    }
    return c
