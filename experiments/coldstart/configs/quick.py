"""A quick run (about 2 minutes on 2 cores): every method, seed 0, two meta-training epochs.

Used to check that a change keeps results identical: run it before and after and diff results.json.
"""

from experiments.coldstart.configs import default


def get_config():
    c = default.get_config()
    c.seeds = (0,)
    c.epochs = 2
    c.patience = 1
    c.finetune_patience = 1
    c.progress = False
    c.report = False
    return c
