"""Meta-RL on a MovieLens-100K user simulator, seeds 0, 1, 2.

The tuned fields come from ``tuned.json``, written by the tune stage on validation users
(``python -m experiments.tune.main --config=experiments/tune/configs/meta_rl.py``; BUILD_NOTES.md).
Override any field on the command line, e.g. ``--config.seeds=0 --config.methods=ppo,maml
--config.meta.inner_lr=1.0``.
"""

import dataclasses
import json
import os

import ml_collections

from experiments.common import set_config_value
from experiments.meta_rl import settings
from metarec.rl import dqn, env, maml, meta_bandit, ppo, rl2


def _section(settings) -> ml_collections.ConfigDict:
    """A library settings dataclass as a config section (every field can be overridden)."""
    return ml_collections.ConfigDict(dataclasses.asdict(settings))


TUNED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned.json")


def get_config() -> ml_collections.ConfigDict:
    """The base config with the choices of the tune stage (``tuned.json``) applied."""
    return apply_tuned(base_config())


def apply_tuned(c: ml_collections.ConfigDict, path: str = TUNED) -> ml_collections.ConfigDict:
    """Set the fields (``section/field``) each tuned method's point names, and ``recommended``."""
    if os.path.exists(path):
        with open(path) as f:
            tuned = json.load(f)
        for point in tuned["methods"].values():
            for field, value in point.items():
                set_config_value(c, field, value)
        c.recommended = tuned["recommended"]
    return c


def base_config() -> ml_collections.ConfigDict:
    """The config before tuning: what the tune stage searches from."""
    c = ml_collections.ConfigDict()
    # simulator: "synthetic" (latent users) or a name in metarec.data.DATASETS
    c.dataset = "ml-100k"
    c.data_dir = ""  # a folder of GroupLens or RecBole files; "" = the offline cache
    c.seeds = (0, 1, 2)  # split, simulator fit, training and evaluation
    # methods (experiments.meta_rl.settings.METHODS)
    c.methods = (
        "random",
        "popular",
        "mf_greedy",
        "egreedy",
        "linucb",
        "thompson",
        "ppo",
        "dqn",
        "ppo_scratch",
        "maml",
        "fomaml",
        "metasgd",
        "metabandit",
        "rl2",
    )
    c.n_train_users = 400  # training users (environments) per seed
    c.n_test_users = 64  # held-out users per seed
    c.n_val_users = 64  # validation users (tuning path only), drawn from the training users
    c.n_items = 100  # catalogue: the most-rated training items
    c.reward = "click"  # per click: 1 ("click") or the predicted rating / 5 ("rating")
    c.env = _section(env.EnvConfig(horizon=20, history_len=10))  # user dynamics
    c.adapt_episodes = (0, 1, 2, 5, 10)  # numbers of adaptation episodes reported
    c.eval_episodes = 4  # evaluation episodes per user and n
    # the item-scoring policy network
    c.embed_dim = 16
    c.hidden = 32
    # non-meta PPO (also the meta-learners' warm start), PPO from scratch per user, DQN
    c.ppo = _section(ppo.PPOConfig(num_updates=150, num_envs=32))
    c.ppo_scratch = _section(ppo.PPOConfig(num_envs=1, update_epochs=4, num_minibatches=1, lr=1e-2))
    c.dqn = _section(dqn.DQNConfig(num_iterations=100, num_envs=16))
    # MAML / FOMAML / Meta-SGD; inner_params: parameters adapted per user ("all" = every one);
    # evaluation takes the meta-training inner step once per adaptation episode
    c.meta = _section(
        maml.MetaRLConfig(
            num_iterations=150,
            meta_batch=16,
            inner_steps=2,
            inner_episodes=1,
            query_episodes=4,
            inner_lr=1.0,  # with inner_credit: the tune stage's first search (validation users)
            meta_lr=3e-3,
            inner_params="item_bias",  # names at commas (a string: a tune stage choice)
            inner_credit="myopic",
        )
    )
    # the meta-learned bandit (starts from the LinUCB setting; metarec.rl.meta_bandit)
    # (the trial length, discount, meta_lr and temperature are those the tune stage's first search
    # chose on validation users; it now searches the user model's size and the training length)
    c.metabandit = _section(
        meta_bandit.MetaBanditConfig(
            meta_lr=0.011314503870417528,
            num_iterations=400,
            temperature=0.015364092985079625,
            trial_episodes=2,
            gamma=0.5591372129344666,
        )
    )
    # the bandits' own constants (ridge lam, LinUCB alpha, Thompson scale ts, epsilon), chosen by
    # the tune stage on validation users like every other method's settings
    c.bandits = settings.bandit_section()
    # RL^2: a GRU memory over the click history (metarec.rl.rl2), meta-trained as the meta-bandit
    c.rl2 = _section(rl2.RL2Config())
    c.recommended = "metabandit"  # the method the README names (set by the tune stage)
    c.online_rounds = 5  # online loop: rounds per streamed test user (0 = skip)
    # bookkeeping: training iterations between checkpoints (also the length of the jitted pieces;
    # the results do not depend on it) and the newest checkpoints kept per (seed, method)
    c.checkpoint_every = 50
    c.keep_checkpoints = 2
    return c
