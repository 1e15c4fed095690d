"""PPO (clipped objective, GAE) for recommendation environments, PureJaxRL style.

``make_train(config, network, env_params) -> train(key)`` returns one pure function that runs the
whole training loop (``lax.scan`` over updates; inside, a vmapped batch of episodes on randomly
drawn users, then ``update_epochs`` x ``num_minibatches`` clipped-PPO steps). Jit it, or vmap it
over seeds. Metrics come back as arrays ``[num_updates]`` and are logged outside jit.
:func:`make_trainer` is the same loop in resumable pieces (checkpointed by :mod:`metarec.rl.loop`).

:func:`ppo_update` is the update on one batch of trajectories; it is reused by the "PPO from
scratch per user" baseline in :mod:`metarec.rl.evaluate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from metarec.rl import env as envlib
from metarec.rl import networks, pg
from metarec.rl.loop import Trainer, iteration_keys
from metarec.rl.rollout import Trajectory, episode_metrics, rollout


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters (``num_envs`` episodes per update)."""

    num_updates: int = 100
    num_envs: int = 32
    update_epochs: int = 4
    num_minibatches: int = 4
    lr: float = 3e-3
    clip_eps: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    gamma: float = 0.95
    gae_lambda: float = 0.9
    max_grad_norm: float = 1.0

    def validate(self) -> None:
        for name in ("num_updates", "num_envs", "update_epochs", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"PPOConfig.clip_eps must be in (0, 1), got {self.clip_eps}")
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ValueError("PPOConfig.gamma and gae_lambda must be in [0, 1]")


def make_optimizer(config: PPOConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(config.lr))


def ppo_loss(params, apply_fn: Callable, batch: dict, config: PPOConfig):
    """Clipped PPO loss on a flat batch (``obs``, ``action``, ``old_logp``, ``adv``, ``target``,
    ``w``)."""
    logp, value, ent = networks.log_probs(apply_fn, params, batch["obs"], batch["action"])
    w = batch["w"]
    wsum = jnp.maximum(jnp.sum(w), 1.0)
    adv = batch["adv"]
    mean = jnp.sum(adv * w) / wsum
    std = jnp.sqrt(jnp.sum(w * (adv - mean) ** 2) / wsum)
    adv = (adv - mean) / (std + 1e-8)
    ratio = jnp.exp(logp - batch["old_logp"])
    clipped = jnp.clip(ratio, 1 - config.clip_eps, 1 + config.clip_eps)
    pg_loss = -jnp.sum(jnp.minimum(ratio * adv, clipped * adv) * w) / wsum
    v_loss = 0.5 * jnp.sum((value - batch["target"]) ** 2 * w) / wsum
    entropy = jnp.sum(ent * w) / wsum
    total = pg_loss + config.vf_coef * v_loss - config.ent_coef * entropy
    return total, {"pg_loss": pg_loss, "v_loss": v_loss, "entropy": entropy}


def ppo_update(
    key,
    params,
    opt_state,
    traj: Trajectory,
    apply_fn: Callable,
    config: PPOConfig,
    tx: optax.GradientTransformation,
):
    """``update_epochs`` passes of minibatch PPO over ``traj`` (leaves ``[B, T, ...]``)."""
    adv, target = pg.gae(
        traj.reward, traj.extras["value"], traj.alive, config.gamma, config.gae_lambda
    )

    def flat(x):
        return x.reshape((-1,) + x.shape[2:])

    data = {
        "obs": jax.tree_util.tree_map(flat, traj.obs),
        "action": flat(traj.action),
        "old_logp": flat(traj.extras["logp"]),
        "adv": flat(adv),
        "target": flat(target),
        "w": flat(traj.alive),
    }
    n = data["action"].shape[0]
    nmb = config.num_minibatches if n % config.num_minibatches == 0 else 1

    def epoch(carry, k):
        params, opt_state = carry
        perm = jax.random.permutation(k, n)
        shuffled = jax.tree_util.tree_map(
            lambda x: x[perm].reshape((nmb, n // nmb) + x.shape[1:]), data
        )

        def mb(carry, batch):
            params, opt_state = carry
            (loss, aux), g = jax.value_and_grad(ppo_loss, has_aux=True)(
                params, apply_fn, batch, config
            )
            upd, opt_state = tx.update(g, opt_state, params)
            return (optax.apply_updates(params, upd), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(mb, (params, opt_state), shuffled)
        return (params, opt_state), jnp.mean(losses)

    (params, opt_state), losses = jax.lax.scan(
        epoch, (params, opt_state), jax.random.split(key, config.update_epochs)
    )
    return params, opt_state, jnp.mean(losses)


def collect(
    key, params, apply_fn: Callable, env_params: envlib.EnvParams, num_envs: int
) -> Trajectory:
    """``num_envs`` episodes of uniformly drawn users from batched ``env_params``."""
    k_u, k_r = jax.random.split(key)
    users = jax.random.randint(k_u, (num_envs,), 0, envlib.num_users(env_params))
    ep = envlib.index_params(env_params, users)
    act = networks.sample_actor(apply_fn, jax.lax.stop_gradient(params), ep.slate_size)
    return jax.vmap(lambda k, e: rollout(k, e, act)[0])(jax.random.split(k_r, num_envs), ep)


def make_trainer(config: PPOConfig, network: networks.Network) -> Trainer:
    """The training loop in resumable pieces (:class:`metarec.rl.loop.Trainer`):
    ``init(key, env_params=None) -> {"params", "opt_state", "key"}``,
    ``run(state, env_params, start, length)``."""
    config.validate()
    tx = make_optimizer(config)

    def init(key, env_params=None):
        del env_params
        k_init, k_loop = jax.random.split(key)
        params = network.init(k_init)
        return {"params": params, "opt_state": tx.init(params), "key": k_loop}

    def run(state, env_params, start, length):
        def body(carry, k):
            params, opt_state = carry
            k_c, k_u = jax.random.split(k)
            traj = collect(k_c, params, network.apply, env_params, config.num_envs)
            params, opt_state, loss = ppo_update(
                k_u, params, opt_state, traj, network.apply, config, tx
            )
            m = episode_metrics(traj)
            return (params, opt_state), {
                "return": m["return"].mean(),
                "ctr": m["ctr"].mean(),
                "loss": loss,
            }

        keys = iteration_keys(state["key"], config.num_updates, start, length)
        (params, opt_state), metrics = jax.lax.scan(
            body, (state["params"], state["opt_state"]), keys
        )
        return {**state, "params": params, "opt_state": opt_state}, metrics

    return Trainer(init, run, config.num_updates)


def make_train(
    config: PPOConfig, network: networks.Network, env_params: envlib.EnvParams | None = None
) -> Callable:
    """``train(key, env_params=<given>) -> {"params", "metrics"}`` with metrics ``"return"``,
    ``"ctr"``, ``"loss"`` over ``[num_updates]`` (the whole :func:`make_trainer` loop in one
    piece)."""
    trainer = make_trainer(config, network)

    def train(key, env_params=env_params):
        if env_params is None:
            raise ValueError("pass env_params to make_train or to train")
        state, metrics = trainer.run(trainer.init(key), env_params, 0, config.num_updates)
        return {"params": state["params"], "metrics": metrics}

    return train
