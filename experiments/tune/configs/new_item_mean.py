"""Validation-only probes of ``cf_new_item_mean`` (new items shrunk toward the user's support
mean) for the recommended hybrid method ``cf_metasgd``. Both write ``tune.json`` in the workdir
and no config file; the tune stage proper (``default.py``) is what chooses the defaults.

* ``grid`` (default): the method at the tune stage's starting point with ``cf_new_item_mean`` in
  0 (off), 0.25, 0.5, 0.75.
* ``search``: the probe that led the tune stage to search ``cf_new_item_mean`` (``float:0:1``,
  starting from the grid's best, 0.5); now the same search as ``default.py``, without writing
  ``tuned.json``.

  python -m experiments.tune.main --config=experiments/tune/configs/new_item_mean.py \\
      --workdir=runs/tune_new_item_mean
  python -m experiments.tune.main --config=experiments/tune/configs/new_item_mean.py:search \\
      --workdir=runs/tune_new_item_mean_search
"""

import ml_collections

from experiments.tune.configs import default


def get_config(mode: str = "grid") -> ml_collections.ConfigDict:
    c = default.get_config()
    c.write_config = ""
    if mode == "search":
        c.spaces["cf_metasgd"]["cf_new_item_mean"] = "float:0.0:1.0"
        c.base.methods["cf_metasgd"]["cf_new_item_mean"] = 0.5
    elif mode == "grid":
        c.spaces = {}
        c.algo = "cf_metasgd"
        c.grid = {"cf_new_item_mean": (0.0, 0.25, 0.5, 0.75)}
    else:
        raise ValueError(f"--config=...new_item_mean.py:{mode}; allowed: grid, search")
    return c
