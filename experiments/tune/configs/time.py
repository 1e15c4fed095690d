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

TO_LAST_STEP = ("cf_knn_new_content", "new_item_step_scale")


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
    # new items' genre kNN and step scale are left to this stage's last step (new_item_scale.py),
    # as before the melu search took them in (this stage has not been rerun since)
    for field in TO_LAST_STEP:
        del c.spaces["cf_metasgd"][field]
    # tried right after the configured point: this stage's last choice (trial 3 of the stage that
    # wrote tuned_time.json in b1bff26), so a stage never ends worse than the point it replaces
    c.warm_starts = {
        "cf_metasgd": {
            "cf_dim": 8,
            "cf_knn": True,
            "cf_knn_mf": False,
            "cf_knn_new_items": False,
            "cf_knn_new_own": False,
            "cf_melu": False,
            "cf_new_item_mean": 0.6176354970758771,
            "cf_reg": 8.187017493932323,
            "cf_user_fields": 3,
            "id_dropout": 0.5454562392827867,
            "inner_lr": 0.14679138450126356,
            "inner_newton": 1.1369428752177473,
            "meta_lr": 0.0010727187395229408,
            "outer_rank_weight": 0.06022547162926983,
            "train_tasks": "crossfit",
        }
    }
    return c
