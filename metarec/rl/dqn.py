"""DQN / Q-learning for recommendation: epsilon-greedy exploration, a replay buffer, a target
network.

``make_train(config, network, env_params) -> train(key)`` runs everything in one ``lax.scan`` over
iterations. Each iteration collects ``num_envs`` epsilon-greedy episodes of uniformly drawn users
(epsilon decays linearly from ``eps_start`` to ``eps_end`` over ``eps_decay_frac`` of training),
writes their alive transitions into a fixed-size circular buffer (static shapes: every slot has a
``valid`` weight), takes ``updates_per_iter`` Adam steps on the Huber TD loss of random buffer
minibatches and copies the online network into the target network every ``target_every`` iterations.

TD target: ``r + gamma * (1 - done) * Q_target(s', argmax_a' Q(s', a'))`` over the next state's
valid actions (double DQN; ``double=False`` uses ``max_a' Q_target``). ``done`` is terminated *or*
truncated: the step fraction is part of the observation, so the horizon is part of the MDP.
The recommendation is ``argmax_a Q(s, a)`` (:func:`metarec.rl.networks.greedy_actor`).
:func:`make_trainer` is the same loop in resumable pieces (checkpointed by :mod:`metarec.rl.loop`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from metarec.rl import env as envlib
from metarec.rl import networks
from metarec.rl.loop import Trainer, iteration_keys
from metarec.rl.rollout import episode_metrics, rollout


@dataclasses.dataclass(frozen=True)
class DQNConfig:
    num_iterations: int = 100
    num_envs: int = 16
    buffer_size: int = 8192
    batch_size: int = 128
    updates_per_iter: int = 4
    lr: float = 3e-3
    gamma: float = 0.95
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_decay_frac: float = 0.5
    target_every: int = 5
    double: bool = True
    max_grad_norm: float = 10.0

    def validate(self) -> None:
        for name in (
            "num_iterations",
            "num_envs",
            "buffer_size",
            "batch_size",
            "updates_per_iter",
            "target_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"DQNConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not (0 <= self.eps_end <= 1 and 0 <= self.eps_start <= 1):
            raise ValueError("DQNConfig.eps_start / eps_end must be in [0, 1]")


def td_loss(params, target_params, apply_fn: Callable, batch: dict, gamma: float, double: bool):
    """Weighted Huber TD loss of a batch of transitions."""
    q, _ = apply_fn(params, batch["obs"])
    q_a = jnp.take_along_axis(q, batch["action"][:, None], -1)[:, 0]
    q_next_t, _ = apply_fn(target_params, batch["next_obs"])
    mask = batch["next_obs"]["action_mask"]
    if double:
        q_next_o, _ = apply_fn(params, batch["next_obs"])
        a_star = jnp.argmax(networks.masked_logits(q_next_o, mask), -1)
        nxt = jnp.take_along_axis(q_next_t, a_star[:, None], -1)[:, 0]
    else:
        nxt = jnp.max(networks.masked_logits(q_next_t, mask), -1)
    any_valid = jnp.sum(mask, -1) > 0
    nxt = jnp.where(any_valid, nxt, 0.0)
    target = jax.lax.stop_gradient(batch["reward"] + gamma * (1.0 - batch["done"]) * nxt)
    w = batch["valid"]
    return jnp.sum(optax.huber_loss(q_a, target) * w) / jnp.maximum(jnp.sum(w), 1.0)


def _transitions(traj):
    """Flatten ``[B, T]`` episodes into transitions with next observations."""
    nxt = jax.tree_util.tree_map(lambda o: jnp.concatenate([o[:, 1:], o[:, -1:]], 1), traj.obs)
    done = (traj.terminated | traj.truncated).astype(jnp.float32)

    def flat(x):
        return x.reshape((-1,) + x.shape[2:])

    return {
        "obs": jax.tree_util.tree_map(flat, traj.obs),
        "next_obs": jax.tree_util.tree_map(flat, nxt),
        "action": flat(traj.action),
        "reward": flat(traj.reward),
        "done": flat(done),
        "valid": flat(traj.alive),
    }


def make_trainer(config: DQNConfig, network: networks.Network) -> Trainer:
    """The training loop in resumable pieces (:class:`metarec.rl.loop.Trainer`):
    ``init(key, env_params) -> {"params", "target", "opt_state", "buffer", "ptr", "size", "key"}``
    (the replay buffer is part of the state, so a resumed run replays the same transitions),
    ``run(state, env_params, start, length)``."""
    config.validate()
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(config.lr))
    decay_iters = max(1, int(config.eps_decay_frac * config.num_iterations))

    def collect_eps(k, params, eps, k_users, env_params, with_metrics=False):
        users = jax.random.randint(k_users, (config.num_envs,), 0, envlib.num_users(env_params))
        ep = envlib.index_params(env_params, users)
        act = networks.epsilon_greedy_actor(network.apply, params, eps)
        traj = jax.vmap(lambda kk, e: rollout(kk, e, act)[0])(
            jax.random.split(k, config.num_envs), ep
        )
        tr = _transitions(traj)
        if with_metrics:
            m = episode_metrics(traj)
            return tr, {"return": m["return"].mean(), "ctr": m["ctr"].mean()}
        return tr

    def init(key, env_params):
        k_init, k_loop = jax.random.split(key)
        params = network.init(k_init)
        # shapes of one transition, for the buffer (abstract evaluation, no compute)
        dummy = jax.eval_shape(lambda: collect_eps(k_init, params, 1.0, k_init, env_params))
        buffer = jax.tree_util.tree_map(
            lambda x: jnp.zeros((config.buffer_size,) + x.shape[1:], x.dtype), dummy
        )
        return {
            "params": params,
            "target": params,
            "opt_state": tx.init(params),
            "buffer": buffer,
            "ptr": jnp.zeros((), jnp.int32),
            "size": jnp.zeros((), jnp.int32),
            "key": k_loop,
        }

    def run(state, env_params, start, length):
        def body(carry, xs):
            params, target, opt_state, buffer, ptr, size = carry
            it, k = xs
            k_c, k_u, k_s = jax.random.split(k, 3)
            frac = jnp.minimum(it / decay_iters, 1.0)
            eps = config.eps_start + frac * (config.eps_end - config.eps_start)
            tr, metrics = collect_eps(k_c, params, eps, k_u, env_params, with_metrics=True)
            n = tr["action"].shape[0]
            idx = (ptr + jnp.arange(n)) % config.buffer_size
            buffer = jax.tree_util.tree_map(lambda b, x: b.at[idx].set(x), buffer, tr)
            ptr = (ptr + n) % config.buffer_size
            size = jnp.minimum(size + n, config.buffer_size)

            def upd(carry, kk):
                params, opt_state = carry
                sel = jax.random.randint(kk, (config.batch_size,), 0, size)
                batch = jax.tree_util.tree_map(lambda b: b[sel], buffer)
                loss, g = jax.value_and_grad(td_loss)(
                    params, target, network.apply, batch, config.gamma, config.double
                )
                u, opt_state = tx.update(g, opt_state, params)
                return (optax.apply_updates(params, u), opt_state), loss

            (params, opt_state), losses = jax.lax.scan(
                upd, (params, opt_state), jax.random.split(k_s, config.updates_per_iter)
            )
            target = jax.tree_util.tree_map(
                lambda t, p: jnp.where((it + 1) % config.target_every == 0, p, t), target, params
            )
            metrics = {**metrics, "loss": jnp.mean(losses), "epsilon": eps}
            return (params, target, opt_state, buffer, ptr, size), metrics

        names = ("params", "target", "opt_state", "buffer", "ptr", "size")
        xs = (
            start + jnp.arange(length),
            iteration_keys(state["key"], config.num_iterations, start, length),
        )
        carry, metrics = jax.lax.scan(body, tuple(state[n] for n in names), xs)
        return {**state, **dict(zip(names, carry))}, metrics

    return Trainer(init, run, config.num_iterations)


def make_train(
    config: DQNConfig, network: networks.Network, env_params: envlib.EnvParams | None = None
) -> Callable:
    """``train(key, env_params=<given>) -> {"params", "metrics"}`` with metrics ``"return"``,
    ``"ctr"``, ``"loss"``, ``"epsilon"`` over ``[num_iterations]`` (the whole :func:`make_trainer`
    loop in one piece)."""
    trainer = make_trainer(config, network)

    def train(key, env_params=env_params):
        if env_params is None:
            raise ValueError("pass env_params to make_train or to train")
        state, metrics = trainer.run(
            trainer.init(key, env_params), env_params, 0, config.num_iterations
        )
        return {"params": state["params"], "metrics": metrics}

    return train
