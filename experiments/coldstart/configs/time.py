"""The README main job on the "time" protocol (PROTOCOL.md: users split by the time of their first
rating, support 15 / query 5 from each user's earliest 20 ratings), reported beside the melu one.

The methods keep the settings the tune stage chose on the melu protocol's validation users (no
test scenario of either protocol was used to choose them).
"""

from experiments.coldstart.configs import default


def get_config():
    c = default.get_config()
    c.protocol = "time"
    return c
