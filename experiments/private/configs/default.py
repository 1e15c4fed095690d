"""User-level differentially private meta-training on MovieLens-100K: the privacy-utility curve.

The method is the recommended meta-learner (``method``, from the cold-start experiment's tuned
config) in its PRIVATE VARIANT: no kNN features and no MF item tables (both read every training
rating outside the private computation); the item tables start ``N(0, 0.1^2)`` and are learned by
the private meta-gradient. ``delta = 1/n_users``. Chosen by code on validation users
(``select``: a grid at epsilon 4 on seed 0): the expected batch and number of steps (pairs of about
equal cost), ``l2_clip`` and ``meta_lr``; the grid's values and the cost budget (3 seeds x 5
epsilons + the grid in about 12 minutes on 2 CPU cores) are fixed a priori.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "ml-100k"
    c.data_dir = ""  # a folder of GroupLens files; "" = the offline cache
    c.download = False
    c.seeds = (0, 1, 2)
    c.method = "cf_metasgd"  # a method of experiments/coldstart/configs (its tuned.json)
    c.epsilons = "1,2,4,8,inf"  # target epsilons; inf = no noise, no clipping (non-private)
    c.delta = 0.0  # 0: 1 / n_users (the number of training users that can form a task)
    c.accountant = "rdp"  # rdp or pld (metarec.meta.accounting)
    # private steps (each one a Poisson sample of the training users) and the expected users per
    # step (sampling rate q = expected_batch / n_users); 0, 0 = chosen by the grid below
    c.steps = 0
    c.expected_batch = 0
    c.capacity_std = 5.0  # padded batch = expected + capacity_std binomial std
    # 0 = chosen by the selection grid below; > 0 = fixed (no selection)
    c.l2_clip = 0.0
    c.meta_lr = 0.0
    c.select = ml_collections.ConfigDict()
    c.select.epsilon = 4.0  # the grid runs at this target epsilon on seed select.seed
    c.select.seed = 0
    # expected_batch:steps pairs of about equal cost (users x steps)
    c.select.batch_steps = "64:250,128:150"
    c.select.l2_clip = "0.3,1.0"
    c.select.meta_lr = "0.003"
    c.chunk_size = 8  # tasks vmapped at once inside a step
    c.eval_every = 50  # validation MAE every n steps (monitoring; the last parameters are released)
    c.eval_chunk = 64
    c.k = 3  # nDCG@k
    c.ckpt_every = 50
    c.keep_checkpoints = 2
    c.log_every = 10
    c.progress = True
    c.report = True  # report/privacy_utility.png
    return c
