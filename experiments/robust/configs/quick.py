"""Seconds-scale smoke config (tests): one seed, one epoch, two budgets, one robust candidate."""

from experiments.robust.configs import default


def get_config():
    c = default.get_config()
    c.seeds = (0,)
    c.epochs = 1
    c.patience = 1
    c.eval_eps = (0.0, 0.5)
    c.pgd_steps = 2
    c.grid = ("0.5:0.5",)
    c.report = False
    return c
