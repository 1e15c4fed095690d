"""Meta-reinforcement learning for recommendation: pure-JAX user environments (gymnax style),
simulators (MovieLens biased-MF, RecSim-style latent users), agents (REINFORCE, PPO, DQN),
MAML / FOMAML / Meta-SGD across users with DiCE inner losses on :mod:`metarec.meta.inner`, bandit
baselines, a meta-learned bandit (the bandits' per-user update with its prior, item
representations, exploration and satiation learned across users), an RL² policy (a GRU memory),
evaluation harness and an online serving loop.

Modules: env, rollout, simulator, networks, pg, reinforce, ppo, dqn, maml, bandits, meta_bandit,
rl2, evaluate, online, loop (training in resumable, checkpointed pieces). The experiment that runs
them all is ``experiments/meta_rl``.
"""

from metarec.rl.env import EnvConfig, EnvParams, EnvState, make_env_params, reset, step
from metarec.rl.maml import MetaRL, MetaRLConfig, make_meta_rl, make_meta_train

# (not `rollout`: it would shadow the module)
from metarec.rl.rollout import Trajectory, episode_metrics

__all__ = [
    "EnvConfig",
    "EnvParams",
    "EnvState",
    "MetaRL",
    "MetaRLConfig",
    "Trajectory",
    "episode_metrics",
    "make_env_params",
    "make_meta_rl",
    "make_meta_train",
    "reset",
    "step",
]
