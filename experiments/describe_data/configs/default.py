"""Describe ml-100k under the "melu" protocol, seed 0."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "ml-100k"  # a name in metarec.data.DATASETS
    c.data_dir = ""  # folder with GroupLens or RecBole files; "" = the cache / the recbole wheel
    c.download = False  # fetch GroupLens' zip into the cache when the dataset is not there
    c.seed = 0  # scenario seed
    c.protocol = "melu"  # cold-start protocol (PROTOCOL.md): melu | time
    return c
