"""Grid search for one meta-learner on validation users only (never on a test scenario).

The cold-start config (``base``) is searched over ``grid`` (field -> candidate values); every other
field keeps the cold-start default. Override e.g. ``--config.algo=metasgd --config.base.epochs=10``.
"""

import ml_collections

from experiments.coldstart.configs import default as coldstart


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.algo = "maml"
    c.seeds = (0,)  # seeds whose validation users are averaged
    c.grid = {"inner_lr": (0.01, 0.05, 0.1), "meta_lr": (0.001, 0.003)}
    c.base = coldstart.get_config()
    return c
