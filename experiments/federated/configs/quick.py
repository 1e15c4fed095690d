"""Seconds-scale run for tests: seed 0, two centralised epochs, a few rounds per setting."""

from experiments.federated.configs import default


def get_config():
    c = default.get_config()
    c.seeds = (0,)
    c.overrides = dict(c.overrides) | {"epochs": 2, "patience": 1, "meta_batch": 32}
    c.settings = ("central", "fed_iid", "fed_noniid", "fed_iid_p10")
    c.fed.n_clients = 20
    c.fed.rounds = 4
    c.fed.rounds_low = 4
    c.fed.eval_every = 2
    c.fed.eval_every_low = 2
    c.fed.client_batch = 2
    c.fed.straggler_prob = 0.2
    c.fed.drop_prob = 0.1
    return c
