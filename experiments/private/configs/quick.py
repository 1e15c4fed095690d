"""A seconds-scale run for tests: one seed, two epsilons, a 2-point grid, a few steps."""

from experiments.private.configs import default


def get_config():
    c = default.get_config()
    c.seeds = (0,)
    c.epsilons = "4,inf"
    c.steps = 6
    c.expected_batch = 16
    c.select.epsilon = 4.0
    c.select.l2_clip = "1.0"
    c.select.meta_lr = "0.003,0.01"
    c.eval_every = 3
    c.ckpt_every = 2
    c.log_every = 2
    c.progress = False
    return c
