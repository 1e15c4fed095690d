"""Adaptation curves on held-out users: CTR, return and regret after ``n`` adaptation episodes.

Protocol (the same for every method, so budgets are equal): for a held-out user, the agent starts
from its initial state and alternates

    evaluate (``eval_episodes`` fresh episodes, metrics recorded as "after n episodes")
    -> one adaptation episode (its interactions are the agent's budget) -> update

for ``n = 0 .. n_max``. Evaluation episodes never change the agent's adaptation state, except that
online agents (bandits) also learn *within* each evaluation episode from a copy of their state, as a
deployed bandit would. Gradient agents update once per adaptation episode (``episode_update``).
With slates (``slate_size > 1``) a step shows a ranked list and the metrics gain ``ndcg`` (the
mean slate nDCG of the steps taken, see :mod:`metarec.rl.env`); ``ctr`` is then clicks per slate.
Regret is the sum over taken steps of the oracle's expected reward (best available item in the
current state) minus the expected reward of the chosen item.

An :class:`EvalAgent` is four pure functions; factories below build them for the policy-network
methods (fixed policy, MAML/Meta-SGD inner steps, PPO from scratch) and the bandit family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from metarec.rl import bandits, networks
from metarec.rl import env as envlib
from metarec.rl import meta_bandit as mblib
from metarec.rl import ppo as ppolib
from metarec.rl.maml import MetaRL
from metarec.rl.rollout import episode_metrics, oracle_rollout, rollout


class EvalAgent(NamedTuple):
    """``init(key) -> state``; ``act(key, state, obs) -> (action, extras)``;
    ``step_update(state, obs, action, reward, info) -> state`` or None (online learners);
    ``episode_update(key, state, traj) -> state`` or None (after each adaptation episode)."""

    init: Callable
    act: Callable
    step_update: Callable | None = None
    episode_update: Callable | None = None


def adaptation_curve(
    key, agent: EvalAgent, env_params: envlib.EnvParams, n_max: int, eval_episodes: int
):
    """Metrics ``{"ctr", "return", "regret"}`` each ``[n_max + 1]`` for one user (mean over the
    evaluation episodes)."""
    k_init, k_loop = jax.random.split(key)
    state = agent.init(k_init)

    def evaluate(k, state):
        def one(kk):
            traj, _ = rollout(kk, env_params, agent.act, state, agent.step_update)
            return episode_metrics(traj)

        m = jax.vmap(one)(jax.random.split(k, eval_episodes))
        return {name: m[name].mean() for name in metric_names(env_params)}

    def body(state, k):
        k_eval, k_ep, k_upd = jax.random.split(k, 3)
        metrics = evaluate(k_eval, state)
        traj, state = rollout(k_ep, env_params, agent.act, state, agent.step_update)
        if agent.episode_update is not None:
            batch = jax.tree_util.tree_map(lambda x: x[None], traj)
            state = agent.episode_update(k_upd, state, batch)
        return state, metrics

    keys = jax.random.split(k_loop, n_max + 1)
    _, metrics = jax.lax.scan(body, state, keys)
    return metrics


def metric_names(env_params: envlib.EnvParams) -> tuple[str, ...]:
    """The metrics of an adaptation curve: ``ctr``, ``return``, ``regret`` (and ``ndcg`` for
    slates)."""
    return ("ctr", "return", "regret") + (("ndcg",) if env_params.slate_size > 1 else ())


def evaluate_users(
    key, agent: EvalAgent, env_params: envlib.EnvParams, n_max: int, eval_episodes: int
):
    """:func:`adaptation_curve` vmapped over the users of batched ``env_params``;
    ``[U, n_max+1]``."""
    keys = jax.random.split(key, envlib.num_users(env_params))
    return jax.vmap(lambda k, e: adaptation_curve(k, agent, e, n_max, eval_episodes))(
        keys, env_params
    )


def oracle_metrics(key, env_params: envlib.EnvParams, episodes: int):
    """Oracle ``{"ctr", "return", "regret"}`` (and ``ndcg``) per user ``[U]`` (mean over
    ``episodes``)."""

    def user(k, e):
        m = jax.vmap(lambda kk: episode_metrics(oracle_rollout(kk, e)))(
            jax.random.split(k, episodes)
        )
        return {name: m[name].mean() for name in metric_names(e)}

    return jax.vmap(user)(jax.random.split(key, envlib.num_users(env_params)), env_params)


# ----------------------------------------------------------------------------- agent factories


def fixed_policy_agent(
    network: networks.Network, params, greedy: bool = False, slate_size: int = 1
) -> EvalAgent:
    """A trained policy served without adaptation (non-meta PPO, DQN with ``greedy=True``)."""

    def act(key, state, obs):
        actor = networks.greedy_actor if greedy else networks.sample_actor
        return actor(network.apply, state, slate_size)(key, None, obs)

    return EvalAgent(init=lambda key: params, act=act)


def meta_agent(
    network: networks.Network, learner: MetaRL, meta_params, slate_size: int = 1
) -> EvalAgent:
    """MAML / FOMAML / Meta-SGD: one inner step (the learner's: same adapted parameters, credit and
    learning rates as in meta-training) per adaptation episode, starting from the meta-learned
    initialisation. Beyond the meta-trained ``inner_steps`` the same step is simply repeated."""

    def act(key, state, obs):
        return networks.sample_actor(network.apply, state["params"], slate_size)(key, None, obs)

    def episode_update(key, state, traj):
        del key
        return {**state, "params": learner.inner_step(state, state["params"], traj)}

    return EvalAgent(init=lambda key: meta_params, act=act, episode_update=episode_update)


def ppo_scratch_agent(
    network: networks.Network, config: ppolib.PPOConfig, slate_size: int = 1
) -> EvalAgent:
    """PPO from scratch per user: a fresh network, one PPO update (``update_epochs`` passes) per
    adaptation episode."""
    tx = ppolib.make_optimizer(config)

    def init(key):
        params = network.init(key)
        return {"params": params, "opt": tx.init(params)}

    def act(key, state, obs):
        return networks.sample_actor(network.apply, state["params"], slate_size)(key, None, obs)

    def episode_update(key, state, traj):
        params, opt, _ = ppolib.ppo_update(
            key, state["params"], state["opt"], traj, network.apply, config, tx
        )
        return {"params": params, "opt": opt}

    return EvalAgent(init=init, act=act, episode_update=episode_update)


def bandit_agent(items: dict, hp: dict, slate_size: int = 1) -> EvalAgent:
    """One method of the linear-bandit family (``hp``: one method's scalars, may be traced)."""
    act = bandits.slate_act(slate_size) if slate_size > 1 else bandits.act
    return EvalAgent(init=lambda key: bandits.init(items, hp), act=act, step_update=bandits.update)


def meta_bandit_agent(params, genres, slate_size: int = 1) -> EvalAgent:
    """The meta-learned bandit (:mod:`metarec.rl.meta_bandit`) with meta-parameters ``params``:
    learns every step, its state carried across episodes like the bandits'."""
    return in_context_agent(mblib.make_agent_fns, params, genres, slate_size)


def in_context_agent(agent_fns: Callable, params, genres, slate_size: int = 1) -> EvalAgent:
    """An in-context agent (``agent_fns``: :func:`metarec.rl.meta_bandit.make_agent_fns`,
    :func:`metarec.rl.rl2.make_agent_fns`) with meta-parameters ``params``: its state is updated
    after every step and carried across episodes."""
    init, act, step_update = agent_fns(params, genres, slate_size)
    return EvalAgent(init=init, act=act, step_update=step_update)


def evaluate_bandits(
    key,
    names,
    items: dict,
    env_params: envlib.EnvParams,
    n_max: int,
    eval_episodes: int,
    hp: dict | None = None,
):
    """All bandit methods ``names`` in one compiled program (vmap over the methods'
    hyper-parameters ``hp``, :func:`bandits.hyper_params`; default: the classic values; may be
    traced, so one program serves every setting).
    Returns ``{name: {"ctr", "return", "regret": [U, n_max+1]}}``."""
    hp = bandits.hyper_params(names) if hp is None else hp
    k = env_params.slate_size
    run = jax.vmap(
        lambda h: evaluate_users(
            key, bandit_agent(items, h, slate_size=k), env_params, n_max, eval_episodes
        )
    )
    out = run(hp)
    return {n: jax.tree_util.tree_map(lambda x, i=i: x[i], out) for i, n in enumerate(names)}
