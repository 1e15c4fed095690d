"""A validation-only grid: the recommended hybrid method (``cf_metasgd`` at the tune stage's
starting point) with its new-item predictions shrunk toward the user's support mean by
``cf_new_item_mean`` (0 = the committed method). Writes ``tune.json`` (rows with the validation
MAE and nDCG@3 on known and on held-out items) and no config file; the tune stage proper
(``default.py``) is what chooses defaults.

  python -m experiments.tune.main --config=experiments/tune/configs/new_item_mean.py \\
      --workdir=runs/tune_new_item_mean
"""

import ml_collections

from experiments.tune.configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.spaces = {}
    c.algo = "cf_metasgd"
    c.grid = {"cf_new_item_mean": (0.0, 0.25, 0.5, 0.75)}
    c.write_config = ""
    return c
