"""REINFORCE with a baseline, PureJaxRL style:
``make_train(config, network, env_params) -> train(key)``.

Each update samples ``num_envs`` episodes of uniformly drawn users and takes one Adam step on
:func:`metarec.rl.pg.reinforce_loss` (leave-one-out baseline by default, which keeps the gradient
unbiased) plus an optional entropy bonus.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from metarec.rl import env as envlib
from metarec.rl import networks, pg
from metarec.rl.ppo import collect
from metarec.rl.rollout import episode_metrics


@dataclasses.dataclass(frozen=True)
class ReinforceConfig:
    num_updates: int = 100
    num_envs: int = 32
    lr: float = 1e-2
    gamma: float = 0.95
    baseline: str = "loo"
    ent_coef: float = 0.0

    def validate(self) -> None:
        if self.num_updates < 1 or self.num_envs < 1:
            raise ValueError("ReinforceConfig.num_updates and num_envs must be >= 1")
        if self.baseline not in pg.BASELINES:
            raise ValueError(
                f"ReinforceConfig.baseline must be one of {pg.BASELINES}, got {self.baseline!r}"
            )


def make_train(
    config: ReinforceConfig, network: networks.Network, env_params: envlib.EnvParams | None = None
) -> Callable:
    """``train(key, env_params=<given>) -> {"params", "metrics"}`` with metrics ``"return"``,
    ``"ctr"``, ``"loss"`` over ``[num_updates]``."""
    config.validate()
    tx = optax.adam(config.lr)

    def loss_fn(params, traj):
        loss = pg.reinforce_loss(params, network.apply, traj, config.gamma, config.baseline)
        if config.ent_coef:
            _, _, ent = networks.log_probs(network.apply, params, traj.obs, traj.action)
            loss = loss - config.ent_coef * jnp.sum(ent * traj.alive) / jnp.maximum(
                jnp.sum(traj.alive), 1.0
            )
        return loss

    def train(key, env_params=env_params):
        if env_params is None:
            raise ValueError("pass env_params to make_train or to train")
        k_init, k_loop = jax.random.split(key)
        params = network.init(k_init)

        def body(carry, k):
            params, opt_state = carry
            traj = collect(k, params, network.apply, env_params, config.num_envs)
            loss, g = jax.value_and_grad(loss_fn)(params, traj)
            upd, opt_state = tx.update(g, opt_state, params)
            m = episode_metrics(traj)
            return (optax.apply_updates(params, upd), opt_state), {
                "return": m["return"].mean(),
                "ctr": m["ctr"].mean(),
                "loss": loss,
            }

        (params, _), metrics = jax.lax.scan(
            body, (params, tx.init(params)), jax.random.split(k_loop, config.num_updates)
        )
        return {"params": params, "metrics": metrics}

    return train
