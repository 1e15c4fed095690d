"""The README main job on the "time" protocol (PROTOCOL.md: users split by the time of their first
rating, support 15 / query 5 from each user's earliest 20 ratings), reported beside the melu one.

The tuned fields come from ``tuned_time.json``, written by the tune stage on this protocol's
validation users (``python -m experiments.tune.main --config=experiments/tune/configs/time.py``);
until that file exists, those of the melu protocol's stage (``tuned.json``).
"""

import os

from experiments.coldstart.configs import default

TUNED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_time.json")


def base_config():
    """The default base config on the time protocol: what the time tune stage searches from."""
    c = default.base_config()
    c.protocol = "time"
    return c


def get_config():
    return default.apply_tuned(base_config(), TUNED if os.path.exists(TUNED) else default.TUNED)
