"""A meta-learned linear bandit: the bandits' per-user update, with everything around it learned
across users by policy gradient (RL² with a bandit-shaped memory).

The per-user state is what LinUCB / Thompson sampling keep, a ridge posterior ``A``, ``b`` over a
user vector ``theta = A^-1 b``, plus per-item evidence (the summed residuals ``e_i`` of the clicks
on item ``i`` under the user vector of the moment, and the count ``n_i``) and the genre fatigue
``f`` of the current episode. All of it is updated after **every** recommendation, within and
across episodes. The policy is a softmax over

    s_i = prior_i + x_i . theta + alpha sqrt(x_i^T A^-1 x_i) + w_item e_i / (n_i + kappa)
          - w_fatigue g_i . f

at temperature ``temp``. Meta-parameters (all learned; initialised at the hand-made LinUCB setting
of :mod:`metarec.rl.bandits`, with the item and fatigue terms off, so meta-training starts from
the bandit):

* ``feats [I, D]``: item representations ``x_i`` (init: intercept + standardised factors of the
  recommender-side MF, the bandits' features, and ``extra_dims`` further learned directions drawn
  small at random, so the user vector can live in a richer space than the MF's rank);
* ``prior [I]``: population score of every item (init: the bandits' MF prior);
* ``theta0 [D]``, ``log_prec [D]``: the prior over user vectors,
  ``N(theta0, diag(exp(log_prec))^-1)`` (the bandits' is ``N(0, I / lam)``): where a new user
  starts and how far, per direction, each click moves them (the update rule's step sizes);
* ``log_alpha``: the exploration bonus; ``log_temp``: the softmax temperature;
* ``item_weight``, ``log_kappa``: how much per-item evidence counts and its shrinkage;
* ``fatigue_weight``, ``decay_logit``: a learned satiation model, ``f <- decay * f + g_a`` over
  the genres ``g`` of the items shown in this episode (the bandits ignore satiation).

Slates (``slate_size = k > 1``): the policy ranks ``k`` items by sampling without replacement from
the same softmax (Plackett-Luce; its exact log-probability enters the loss), and the state is
updated with every *examined* position's click or no-click (the cascade model's feedback, as the
bandits do).

Meta-training (:func:`make_trainer`): each iteration draws ``meta_batch`` training users; for each
it runs ``trials`` independent trials of ``trial_episodes`` consecutive episodes, the state carried
from episode to episode exactly as in evaluation. The loss is REINFORCE over the whole trial,
``-sum_t log pi(a_t | h_t) (G_t - b_t)``: ``G_t`` the discounted clicks from step ``t`` to the end
of the trial (so exploration that pays off in a later episode is credited), ``b_t`` the
leave-one-out mean of the other trials of the same user. ``log pi`` is differentiated through the
state ``h_t`` (a function of the meta-parameters and of the sampled actions and clicks), which is
the exact score-function gradient of the trial's expected clicks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from metarec.rl import env as envlib
from metarec.rl import networks, pg
from metarec.rl.loop import Trainer, iteration_keys
from metarec.rl.rollout import rollout


@dataclasses.dataclass(frozen=True)
class MetaBanditConfig:
    """Meta-learned bandit settings (initial values of the meta-parameters and the loop's)."""

    temperature: float = 0.05
    alpha: float = 0.5
    prior_precision: float = 1.0
    fatigue_weight: float = 0.0
    item_weight: float = 0.0
    item_prior: float = 4.0
    fatigue_decay: float = 0.8
    trial_episodes: int = 4
    trials: int = 4
    gamma: float = 0.9
    meta_batch: int = 32
    meta_lr: float = 3e-3
    num_iterations: int = 200
    max_grad_norm: float = 1.0
    extra_dims: int = 0  # learned item/user directions beyond the recommender-side factors
    extra_scale: float = 0.1  # the initial scale of those directions (random, seeded)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and what is allowed."""
        checks = [
            ("temperature", self.temperature > 0, "> 0"),
            ("alpha", self.alpha > 0, "> 0 (the bonus is learned in log space)"),
            ("prior_precision", self.prior_precision > 0, "> 0"),
            ("item_prior", self.item_prior > 0, "> 0"),
            ("fatigue_decay", 0 < self.fatigue_decay < 1, "in (0, 1)"),
            ("extra_dims", self.extra_dims >= 0, ">= 0"),
            ("extra_scale", self.extra_scale > 0, "> 0"),
        ]
        check_fields(self, checks + loop_checks(self))


def loop_checks(config) -> list[tuple[str, bool, str]]:
    """``(field, ok, allowed)`` for the meta-training loop's fields of any agent config that
    :func:`make_trainer` trains (the trial length, the leave-one-out baseline, the optimiser)."""
    return [
        ("trial_episodes", config.trial_episodes >= 1, ">= 1"),
        ("trials", config.trials >= 2, ">= 2 (leave-one-out baseline)"),
        ("gamma", 0 <= config.gamma <= 1, "in [0, 1]"),
        ("meta_batch", config.meta_batch >= 1, ">= 1"),
        ("meta_lr", config.meta_lr > 0, "> 0"),
        ("num_iterations", config.num_iterations >= 1, ">= 1"),
        ("max_grad_norm", config.max_grad_norm > 0, "> 0"),
    ]


def check_fields(config, checks) -> None:
    """Raise ``ValueError`` naming the first failing field of ``checks`` and what is allowed."""
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(
                f"{type(config).__name__}.{name}={getattr(config, name)!r} is invalid: "
                f"must be {allowed}"
            )


def initial_params(items: dict, config: MetaBanditConfig, key=None) -> dict:
    """Meta-parameters at the hand-made bandit setting. ``items``: :func:`bandits.item_inputs`;
    ``key`` draws the ``extra_dims`` directions (default ``PRNGKey(0)``; unused without them)."""
    feats = jnp.asarray(items["feats"], jnp.float32)
    if config.extra_dims:
        key = jax.random.PRNGKey(0) if key is None else key
        extra = config.extra_scale * jax.random.normal(key, (feats.shape[0], config.extra_dims))
        feats = jnp.concatenate([feats, extra], 1)
    d = feats.shape[1]
    p = config.fatigue_decay
    return {
        "feats": feats,
        "prior": jnp.asarray(items["mf"], jnp.float32),
        "theta0": jnp.zeros((d,), jnp.float32),
        "log_prec": jnp.full((d,), math.log(config.prior_precision), jnp.float32),
        "log_alpha": jnp.asarray(math.log(config.alpha), jnp.float32),
        "log_temp": jnp.asarray(math.log(config.temperature), jnp.float32),
        "fatigue_weight": jnp.asarray(config.fatigue_weight, jnp.float32),
        "item_weight": jnp.asarray(config.item_weight, jnp.float32),
        "log_kappa": jnp.asarray(math.log(config.item_prior), jnp.float32),
        "decay_logit": jnp.asarray(math.log(p / (1 - p)), jnp.float32),
    }


def init_state(params: dict, n_genres: int) -> dict:
    """A new user's state: the prior (``A^-1 b = theta0``), no per-item evidence, no fatigue."""
    a0 = jnp.diag(jnp.exp(params["log_prec"]))
    n_items = params["prior"].shape[0]
    return {
        "A": a0,
        "b": a0 @ params["theta0"],
        "item_resid": jnp.zeros((n_items,), jnp.float32),
        "item_count": jnp.zeros((n_items,), jnp.float32),
        "fatigue": jnp.zeros((n_genres,), jnp.float32),
    }


def logits(params: dict, genres: jax.Array, state: dict, obs: dict) -> jax.Array:
    """The policy's masked logits ``[I]`` in ``state`` (see the module docstring)."""
    a_inv = jnp.linalg.inv(state["A"])
    a_inv = 0.5 * (a_inv + a_inv.T)
    x = params["feats"]
    theta = a_inv @ state["b"]
    bonus = jnp.sqrt(jnp.maximum(jnp.einsum("id,de,ie->i", x, a_inv, x), 1e-12))
    fresh = obs["step"] > 0  # the fatigue of an earlier episode does not carry over
    fatigue = genres @ (state["fatigue"] * fresh)
    item = state["item_resid"] / (state["item_count"] + jnp.exp(params["log_kappa"]))
    s = (
        params["prior"]
        + x @ theta
        + jnp.exp(params["log_alpha"]) * bonus
        + params["item_weight"] * item
        - params["fatigue_weight"] * fatigue
    )
    return networks.masked_logits(s * jnp.exp(-params["log_temp"]), obs["action_mask"])


def update(params: dict, genres: jax.Array, state: dict, obs: dict, action, info) -> dict:
    """The per-step update: the ridge posterior with the click's residual over the prior, the
    item's evidence and the episode's genre fatigue. Invalid actions change nothing; a slate
    ``action [k]`` updates with each examined position."""
    a = jnp.clip(action, 0, genres.shape[0] - 1)
    x = params["feats"][a]
    decay = jax.nn.sigmoid(params["decay_logit"])
    fatigue = state["fatigue"] * (obs["step"] > 0)
    # the click's residual under the current user vector: evidence about this item for this user
    theta = jnp.linalg.solve(state["A"], state["b"])
    if action.ndim == 1:  # a slate: every examined position is one observation
        w, click = info["examined"], info["clicks_at"]
        target = click - params["prior"][a]
        return {
            "A": state["A"] + jnp.einsum("k,kd,ke->de", w, x, x),
            "b": state["b"] + (w * target) @ x,
            "item_resid": state["item_resid"].at[a].add(w * (target - x @ theta)),
            "item_count": state["item_count"].at[a].add(w),
            "fatigue": jnp.where(jnp.sum(w) > 0, decay * fatigue + w @ genres[a], fatigue),
        }
    ok = (~info["invalid"]).astype(jnp.float32)
    resid = info["click"] - params["prior"][a] - x @ theta
    return {
        "A": state["A"] + ok * jnp.outer(x, x),
        "b": state["b"] + ok * x * (info["click"] - params["prior"][a]),
        "item_resid": state["item_resid"].at[a].add(ok * resid),
        "item_count": state["item_count"].at[a].add(ok),
        "fatigue": jnp.where(ok > 0, decay * fatigue + genres[a], fatigue),
    }


def make_agent_fns(
    params: dict, genres: jax.Array, slate_size: int = 1
) -> tuple[Callable, Callable, Callable]:
    """``(init(key) -> state, act(key, state, obs) -> (action, {"logp"}), step_update)`` for
    :func:`metarec.rl.rollout.rollout` and :class:`metarec.rl.evaluate.EvalAgent`."""

    def init(key):
        del key
        return init_state(params, genres.shape[1])

    def act(key, state, obs):
        lg = logits(params, genres, state, obs)
        if slate_size > 1:
            a, logp = networks.sample_slate(key, lg, slate_size)
            return a, {"logp": logp}
        a = jax.random.categorical(key, lg).astype(jnp.int32)
        return a, {"logp": jax.nn.log_softmax(lg)[a]}

    def step_update(state, obs, action, reward, info):
        del reward
        return update(params, genres, state, obs, action, info)

    return init, act, step_update


def trial(
    key,
    params: dict,
    genres: jax.Array,
    env_params: envlib.EnvParams,
    episodes: int,
    agent_fns: Callable | None = None,
):
    """``episodes`` consecutive episodes of one user, the state carried across them; returns
    ``(logp, clicks, alive)`` each ``[episodes * T]`` (``logp`` differentiable in ``params``).
    ``agent_fns``: an in-context agent's :func:`make_agent_fns` (default: this module's)."""
    init, act, step_update = (agent_fns or make_agent_fns)(params, genres, env_params.slate_size)

    def body(state, k):
        traj, state = rollout(k, env_params, act, state, step_update)
        return state, (traj.extras["logp"], traj.info["click"], traj.alive)

    _, (logp, clicks, alive) = jax.lax.scan(body, init(None), jax.random.split(key, episodes))
    return logp.reshape(-1), clicks.reshape(-1), alive.reshape(-1)


def trial_loss(
    params: dict, key, genres: jax.Array, env_params, config, agent_fns: Callable | None = None
):
    """REINFORCE loss of ``config.trials`` trials of one user (leave-one-out baseline); aux: the
    trials' CTR. ``config``: a :class:`MetaBanditConfig` or any config with its loop fields."""
    keys = jax.random.split(key, config.trials)
    logp, clicks, alive = jax.vmap(
        lambda k: trial(k, params, genres, env_params, config.trial_episodes, agent_fns)
    )(keys)
    returns = pg.discounted_returns(clicks, alive, config.gamma)
    n = config.trials
    baseline = (returns.sum(0, keepdims=True) - returns) / (n - 1)
    adv = jax.lax.stop_gradient(returns - baseline) * alive
    loss = -jnp.sum(logp * adv) / jnp.maximum(jnp.sum(alive), 1.0)
    ctr = jnp.sum(clicks * alive) / jnp.maximum(jnp.sum(alive), 1.0)
    return loss, ctr


def make_trainer(config, agent_fns: Callable | None = None) -> Trainer:
    """Meta-training in resumable pieces (:class:`metarec.rl.loop.Trainer`) of an in-context agent
    (``agent_fns``, default this module's :func:`make_agent_fns`; ``config`` has the loop fields of
    :class:`MetaBanditConfig`):
    ``init(key, env_params, init_params) -> {"params", "opt_state", "key", "genres"}``
    (``init_params``: the starting meta-parameters, e.g. :func:`initial_params`; the catalogue's
    genres are read from ``env_params``: item content, the same for every user);
    ``run(state, env_params, start, length) -> (state, {"loss", "ctr"})``."""
    config.validate()
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(config.meta_lr))

    def batch_loss(params, key, genres, ep):
        keys = jax.random.split(key, config.meta_batch)
        losses, ctr = jax.vmap(lambda k, e: trial_loss(params, k, genres, e, config, agent_fns))(
            keys, ep
        )
        return losses.mean(), ctr.mean()

    def init(key, env_params, init_params):
        genres = jnp.asarray(
            env_params.item_genres.reshape((-1,) + env_params.item_genres.shape[-2:])[0]
        )
        return {
            "params": init_params,
            "opt_state": tx.init(init_params),
            "key": key,
            "genres": genres,
        }

    def run(state, env_params, start, length):
        n_users = envlib.num_users(env_params)
        genres = state["genres"]

        def body(carry, k):
            params, opt_state = carry
            k_u, k_l = jax.random.split(k)
            users = jax.random.randint(k_u, (config.meta_batch,), 0, n_users)
            ep = envlib.index_params(env_params, users)
            (loss, ctr), g = jax.value_and_grad(batch_loss, has_aux=True)(params, k_l, genres, ep)
            upd, opt_state = tx.update(g, opt_state, params)
            return (optax.apply_updates(params, upd), opt_state), {"loss": loss, "ctr": ctr}

        keys = iteration_keys(state["key"], config.num_iterations, start, length)
        (params, opt_state), metrics = jax.lax.scan(
            body, (state["params"], state["opt_state"]), keys
        )
        return {**state, "params": params, "opt_state": opt_state}, metrics

    return Trainer(init, run, config.num_iterations)
