"""Fixed-length rollouts with ``lax.scan`` and per-episode metrics.

Every episode runs exactly ``params.horizon`` steps; after the user left (or the horizon was hit)
the environment is a no-op and ``alive`` is 0, so every loss and metric is masked by ``alive``.

An *actor* is ``act_fn(key, agent_state, obs) -> (action, extras)`` where ``extras`` is a dict of
per-step arrays to keep (log-probs, values, ...). Agents that learn online during an episode
(bandits) also pass ``update_fn(agent_state, obs, action, reward, info) -> agent_state``; stateless
policies use ``agent_state=None`` and no ``update_fn``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from metarec.rl import env as envlib


@flax.struct.dataclass
class Trajectory:
    """One episode (or a batch of episodes with leading axes) of ``T = horizon`` steps.

    ``obs`` is the observation *before* each step; ``alive [T]`` is 1.0 for the steps that were
    really taken. ``info`` is the environment's info dict, ``extras`` the actor's.
    """

    obs: Any
    action: jax.Array
    reward: jax.Array
    alive: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    info: Any
    extras: Any


def rollout(
    key: jax.Array,
    env_params: envlib.EnvParams,
    act_fn: Callable,
    agent_state: Any = None,
    update_fn: Callable | None = None,
) -> tuple[Trajectory, Any]:
    """Run one episode for one user; returns ``(trajectory, final agent_state)``."""
    k_reset, k_steps = jax.random.split(key)
    obs, state = envlib.reset(k_reset, env_params)

    def body(carry, k):
        obs, state, agent_state = carry
        k_act, k_env = jax.random.split(k)
        action, extras = act_fn(k_act, agent_state, obs)
        alive = (~state.done).astype(jnp.float32)
        obs2, state2, reward, term, trunc, info = envlib.step(k_env, state, action, env_params)
        if update_fn is not None:
            new_agent = update_fn(agent_state, obs, action, reward, info)
            agent_state = jax.tree_util.tree_map(
                lambda n, o: jnp.where(alive > 0, n, o), new_agent, agent_state
            )
        out = Trajectory(
            obs=obs,
            action=action,
            reward=reward,
            alive=alive,
            terminated=term,
            truncated=trunc,
            info=info,
            extras=extras,
        )
        return (obs2, state2, agent_state), out

    keys = jax.random.split(k_steps, env_params.horizon)
    (_, _, agent_state), traj = jax.lax.scan(body, (obs, state, agent_state), keys)
    return traj, agent_state


def rollouts(key: jax.Array, env_params: envlib.EnvParams, act_fn: Callable, n: int) -> Trajectory:
    """``n`` independent episodes of one user with a stateless actor; leaves ``[n, T, ...]``."""
    keys = jax.random.split(key, n)
    return jax.vmap(lambda k: rollout(k, env_params, act_fn)[0])(keys)


def episode_metrics(traj: Trajectory) -> dict[str, jax.Array]:
    """Per-episode ``return``, ``clicks``, ``steps``, ``ctr`` (clicks / steps taken) and ``regret``
    (sum over taken steps of oracle expected reward minus the chosen action's expected reward);
    for slates also ``ndcg`` (mean over the steps taken). Works on any leading batch shape (reduces
    the last, time axis)."""
    alive = traj.alive
    clicks = jnp.sum(traj.info["click"] * alive, -1)
    steps = jnp.sum(alive, -1)
    regret = jnp.sum((traj.info["best_expected_reward"] - traj.info["expected_reward"]) * alive, -1)
    out = {
        "return": jnp.sum(traj.reward * alive, -1),
        "clicks": clicks,
        "steps": steps,
        "ctr": clicks / jnp.maximum(steps, 1.0),
        "regret": regret,
    }
    if "ndcg" in traj.info:
        out["ndcg"] = jnp.sum(traj.info["ndcg"] * alive, -1) / jnp.maximum(steps, 1.0)
    return out


def oracle_rollout(key: jax.Array, env_params: envlib.EnvParams) -> Trajectory:
    """One episode of the exact oracle (argmax of the true expected reward in the true state)."""
    k_reset, k_steps = jax.random.split(key)
    obs, state = envlib.reset(k_reset, env_params)

    def body(carry, k):
        obs, state = carry
        action = envlib.oracle_action(state, env_params)
        alive = (~state.done).astype(jnp.float32)
        obs2, state2, reward, term, trunc, info = envlib.step(k, state, action, env_params)
        out = Trajectory(
            obs=obs,
            action=action,
            reward=reward,
            alive=alive,
            terminated=term,
            truncated=trunc,
            info=info,
            extras={},
        )
        return (obs2, state2), out

    keys = jax.random.split(k_steps, env_params.horizon)
    _, traj = jax.lax.scan(body, (obs, state), keys)
    return traj
