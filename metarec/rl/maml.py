"""MAML and Meta-SGD for RL across users (every user is an environment).

Objective. For a user ``u`` with return ``J_u(theta) = E_{tau ~ pi_theta, u}[sum_t gamma^t r_t]``,
MAML-RL maximises ``E_u[J_u(theta_K)]`` where
``theta_{k+1} = theta_k + alpha * grad_hat J_u(theta_k)`` and ``grad_hat`` is a policy-gradient
estimate from ``inner_episodes`` support episodes sampled with the current ``theta_k``. The outer
(query) loss is the policy-gradient surrogate on ``query_episodes`` episodes sampled with the
adapted ``theta_K``.

Second order, done right. The inner update is ``theta - alpha * grad L_in(theta)`` with ``L_in`` the
**DiCE** surrogate (:func:`metarec.rl.pg.dice_loss`): its log-probabilities are *recomputed* from
``theta`` on the stored support episodes, and its MagicBox makes ``grad^2 L_in`` an unbiased
estimate of ``-grad^2 J`` — including the ``grad log pi grad log pi^T R`` term that the naive
``log pi * R`` surrogate silently drops (its Hessian is only ``sum grad^2 log pi * R``). The
meta-gradient is then plain ``jax.grad`` of the query loss through the (``lax.scan``-ned) inner
loop, so ``d theta_K / d theta`` contains the correct Hessian estimate. As the number of support
episodes grows this estimator converges to the gradient of ``J(theta + alpha grad J(theta))`` (the
"expected-update" MAML objective used by ProMP/T-MAML); the E-MAML term
``grad log pi(tau_support) * J(theta')`` is *not* added (the policy-gradient tests check the
estimator against the exact meta-gradient of that objective on a bandit). Sampling always uses
``stop_gradient`` parameters (actions are discrete; no gradient flows through them anyway).

Each inner step is one step of :func:`metarec.meta.inner.adapt` (the inner-loop primitive shared
with the cold-start learners) on the DiCE loss of episodes just sampled with the current
parameters: unlike a supervised support set, the support episodes are re-drawn on-policy before
every step, so the ``inner_steps`` loop (a ``lax.scan``) stays here.

Options: ``first_order=True`` stops the gradient through the inner gradients (FOMAML);
``meta_sgd=True`` learns a per-parameter inner learning rate (Meta-SGD) initialised at ``inner_lr``
(used clipped at 0: a learned rate never turns the inner step into gradient descent on the return);
``inner_params`` names the parameters the inner loop adapts (``None``: all of them), resolved as a
:mod:`metarec.meta.inner` mask by :func:`inner_mask`: a name is a top-level parameter
(``"item_bias"``) or a ``/``-separated path (``"user/bias"``). The others keep their meta-learned
values for every user (their inner learning rates are 0, also for Meta-SGD). Adapting only per-item
parameters (``("item_bias",)``) is what makes adaptation help on MovieLens: a policy-gradient step
on the shared history encoder from one 20-step episode destroys the within-episode feedback
behaviour the policy learned from all users, at any inner step size (BUILD_NOTES.md, "Meta-RL").
``inner_credit="myopic"`` makes the inner step the per-step (contextual-bandit) policy gradient of
:func:`metarec.rl.pg.dice_objective` (each click credited to its own recommendation), much less
noisy from one episode than the return estimator (``"causal"``); the outer (query) loss is always
the full DiCE return, and ``jax.grad`` through the inner loop stays exact for whichever inner
surrogate is used. Evaluation (:func:`metarec.rl.evaluate.meta_agent`) takes exactly this inner step
once per adaptation episode. Meta-batches of users are ``vmap``-ped; ``make_meta_train`` jits the
whole loop (``lax.scan``); ``make_meta_trainer`` is the same loop in resumable pieces (checkpointed
by :mod:`metarec.rl.loop`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from metarec.meta import inner
from metarec.rl import env as envlib
from metarec.rl import networks, pg
from metarec.rl.loop import Trainer, iteration_keys
from metarec.rl.rollout import episode_metrics, rollouts


@dataclasses.dataclass(frozen=True)
class MetaRLConfig:
    """MAML-RL / Meta-SGD settings."""

    inner_steps: int = 2
    inner_episodes: int = 1
    query_episodes: int = 4
    inner_lr: float = 0.5
    first_order: bool = False
    meta_sgd: bool = False
    inner_baseline: str = "episode"
    outer_baseline: str = "loo"
    gamma: float = 0.95
    meta_lr: float = 3e-3
    meta_batch: int = 16
    num_iterations: int = 200
    max_grad_norm: float = 1.0
    inner_params: tuple[str, ...] | None = None
    inner_credit: str = "causal"

    def validate(self) -> None:
        for name in (
            "inner_steps",
            "inner_episodes",
            "query_episodes",
            "meta_batch",
            "num_iterations",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"MetaRLConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("inner_baseline", "outer_baseline"):
            if getattr(self, name) not in pg.BASELINES:
                raise ValueError(f"MetaRLConfig.{name} must be one of {pg.BASELINES}")
        if self.inner_baseline == "loo" and self.inner_episodes < 2:
            raise ValueError("inner_baseline='loo' needs inner_episodes >= 2")
        if self.outer_baseline == "loo" and self.query_episodes < 2:
            raise ValueError("outer_baseline='loo' needs query_episodes >= 2")
        if self.inner_credit not in pg.CREDITS:
            raise ValueError(
                f"MetaRLConfig.inner_credit must be one of {pg.CREDITS}, got {self.inner_credit!r}"
            )
        if self.inner_credit == "myopic" and self.inner_baseline == "value":
            raise ValueError(
                "MetaRLConfig: inner_credit='myopic' has no critic baseline "
                "(inner_baseline='value')"
            )
        if self.inner_params is not None and not self.inner_params:
            raise ValueError(
                "MetaRLConfig.inner_params must name at least one parameter (None: all)"
            )


class MetaRL(NamedTuple):
    """Pure functions of a meta-RL learner (optax-style NamedTuple).

    ``init(key) -> meta_params`` (``{"params", "lr"}``; ``lr`` is a pytree like ``params``),
    ``inner_step(meta_params, params, traj) -> params`` (one adaptation step on a batch of
    episodes),
    ``adapt(key, meta_params, env_params) -> params`` (``inner_steps`` steps on fresh episodes),
    ``meta_loss(meta_params, key, env_params) -> (loss, aux)`` for one user.
    """

    init: Callable
    inner_step: Callable
    adapt: Callable
    meta_loss: Callable


def inner_mask(inner_params: tuple[str, ...] | None) -> inner.MaskLike:
    """The :mod:`metarec.meta.inner` mask of ``MetaRLConfig.inner_params``: a leaf is adapted when
    its path (``"user/bias"``) is one of the names or lies below one (``"user"``); ``None``: all.
    Resolving it raises ``ValueError`` for a name that matches no parameter."""
    if inner_params is None:
        return None
    select = inner.path_filter("^(" + "|".join(map(re.escape, inner_params)) + ")(/|$)")

    def mask(params):
        paths = [inner.path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        unknown = [
            n for n in inner_params if not any(re.match(f"{re.escape(n)}(/|$)", p) for p in paths)
        ]
        if unknown:
            raise ValueError(
                f"MetaRLConfig.inner_params: no parameters {unknown}; the network has {paths}"
            )
        return select(params)

    return mask


def make_meta_rl(network: networks.Network, config: MetaRLConfig) -> MetaRL:
    """Build the MAML / FOMAML / Meta-SGD learner for ``network``."""
    config.validate()
    apply_fn = network.apply
    mask = inner_mask(config.inner_params)

    def init(key):
        params = network.init(key)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        on = inner.resolve_mask(mask, params)
        lr = [jnp.full_like(p, config.inner_lr if m else 0.0) for p, m in zip(leaves, on)]
        return {"params": params, "lr": jax.tree_util.tree_unflatten(treedef, lr)}

    def support_loss(params, traj):
        return pg.dice_loss(
            params, apply_fn, traj, config.gamma, config.inner_baseline, config.inner_credit
        )

    def rates(meta_params, params):
        """Per-leaf inner learning rates: the (clipped) meta-parameters' on adapted leaves, 0 on
        the others."""
        lr = meta_params["lr"] if config.meta_sgd else jax.lax.stop_gradient(meta_params["lr"])
        leaves, treedef = jax.tree_util.tree_flatten(lr)
        on = inner.resolve_mask(mask, params)
        out = [jnp.maximum(a, 0.0) if m else jnp.zeros_like(a) for a, m in zip(leaves, on)]
        return jax.tree_util.tree_unflatten(treedef, out)

    def inner_step(meta_params, params, traj):
        # The mask acts through zero rates, not through adapt's mask=: that would skip the frozen
        # leaves' inner gradients and give the same meta-gradient summed in another order, i.e.
        # other last bits in every trained policy and result.
        lr = rates(meta_params, params)
        return inner.adapt(
            params, traj, support_loss, steps=1, lr=lr, first_order=config.first_order
        )

    def sample(key, params, env_params, n):
        act = networks.sample_actor(apply_fn, jax.lax.stop_gradient(params), env_params.slate_size)
        return rollouts(key, env_params, act, n)

    def adapt_with_trajs(key, meta_params, env_params):
        # every inner step draws its support episodes from the current (adapted) policy
        def body(params, k):
            traj = sample(k, params, env_params, config.inner_episodes)
            return inner_step(meta_params, params, traj), episode_metrics(traj)["return"].mean()

        return jax.lax.scan(body, meta_params["params"], jax.random.split(key, config.inner_steps))

    def adapt(key, meta_params, env_params):
        return adapt_with_trajs(key, meta_params, env_params)[0]

    def meta_loss(meta_params, key, env_params):
        k_in, k_out = jax.random.split(key)
        params, inner_returns = adapt_with_trajs(k_in, meta_params, env_params)
        query = sample(k_out, params, env_params, config.query_episodes)
        loss = pg.dice_loss(params, apply_fn, query, config.gamma, config.outer_baseline)
        m = episode_metrics(query)
        return loss, {
            "pre_return": inner_returns[0],
            "post_return": m["return"].mean(),
            "post_ctr": m["ctr"].mean(),
        }

    return MetaRL(init, inner_step, adapt, meta_loss)


def make_meta_trainer(config: MetaRLConfig, network: networks.Network) -> Trainer:
    """Meta-training in resumable pieces (:class:`metarec.rl.loop.Trainer`):
    ``init(key, env_params=None, init_params=None) -> {"params": meta_params, "opt_state", "key"}``,
    ``run(state, env_params, start, length)``. See :func:`make_meta_train`."""
    learner = make_meta_rl(network, config)
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(config.meta_lr))

    def batch_loss(meta_params, key, ep):
        keys = jax.random.split(key, config.meta_batch)
        losses, aux = jax.vmap(learner.meta_loss, in_axes=(None, 0, 0))(meta_params, keys, ep)
        return jnp.mean(losses), jax.tree_util.tree_map(jnp.mean, aux)

    def init(key, env_params=None, init_params=None):
        del env_params
        k_init, k_loop = jax.random.split(key)
        meta_params = learner.init(k_init)
        if init_params is not None:  # warm start, e.g. from a PPO policy trained on all users
            meta_params = {**meta_params, "params": init_params}
        return {"params": meta_params, "opt_state": tx.init(meta_params), "key": k_loop}

    def run(state, env_params, start, length):
        n_users = envlib.num_users(env_params)

        def body(carry, k):
            meta_params, opt_state = carry
            k_u, k_l = jax.random.split(k)
            users = jax.random.randint(k_u, (config.meta_batch,), 0, n_users)
            ep = envlib.index_params(env_params, users)
            (loss, aux), g = jax.value_and_grad(batch_loss, has_aux=True)(meta_params, k_l, ep)
            upd, opt_state = tx.update(g, opt_state, meta_params)
            return (optax.apply_updates(meta_params, upd), opt_state), {"loss": loss, **aux}

        keys = iteration_keys(state["key"], config.num_iterations, start, length)
        (meta_params, opt_state), metrics = jax.lax.scan(
            body, (state["params"], state["opt_state"]), keys
        )
        return {**state, "params": meta_params, "opt_state": opt_state}, metrics

    return Trainer(init, run, config.num_iterations)


def make_meta_train(
    config: MetaRLConfig, network: networks.Network, env_params: envlib.EnvParams | None = None
) -> Callable:
    """``train(key, env_params=<given>, init_params=None) -> {"meta_params", "metrics"}``
    (metrics over ``[num_iterations]``).

    ``init_params`` (optional) warm-starts the meta-initialisation, e.g. from a PPO policy trained
    on all training users: meta-training then only has to make it *adaptable* (much cheaper than
    learning the policy from scratch through the meta-gradient alone).

    Each iteration draws ``meta_batch`` users uniformly from the batched training ``env_params``,
    vmaps ``meta_loss`` over them, and takes one clipped Adam step on the mean. The per-parameter
    learning rates are meta-learned only with ``meta_sgd=True`` (otherwise their gradient is zero).
    The same loop in resumable pieces: :func:`make_meta_trainer`.
    """
    trainer = make_meta_trainer(config, network)

    def train(key, env_params=env_params, init_params=None):
        if env_params is None:
            raise ValueError("make_meta_train: pass env_params to make_meta_train or to train")
        state = trainer.init(key, env_params, init_params)
        state, metrics = trainer.run(state, env_params, 0, config.num_iterations)
        return {"meta_params": state["params"], "metrics": metrics}

    return train
