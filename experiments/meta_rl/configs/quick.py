"""Tiny sizes for a smoke run (about a minute per seed on 2 cores).

Used to check that a change keeps results identical: run it before and after and diff
``rl_results.json``.
"""

from experiments.meta_rl.configs import default


def get_config():
    c = default.get_config()
    c.n_train_users = 64
    c.n_test_users = 16
    c.n_items = 30
    c.env.horizon = 8
    c.env.history_len = 4
    c.adapt_episodes = (0, 1, 2)
    c.eval_episodes = 2
    c.ppo.num_updates = 20
    c.ppo.num_envs = 8
    c.dqn.num_iterations = 10
    c.dqn.num_envs = 4
    c.dqn.buffer_size = 1024
    c.dqn.batch_size = 32
    c.meta.num_iterations = 10
    c.meta.meta_batch = 4
    c.metabandit.num_iterations = 10
    c.metabandit.meta_batch = 4
    c.rl2.num_iterations = 10
    c.rl2.meta_batch = 4
    c.online_rounds = 2
    return c
