"""Policy-gradient estimators on fixed-length, ``alive``-masked trajectories.

All functions take a batch of episodes of one user (``Trajectory`` with leaves ``[B, T, ...]``) and
the policy ``(apply_fn, params)``; log-probabilities are *recomputed* from ``params`` and the stored
observations and actions, so the estimators are differentiable in ``params`` to any order. (The
observations depend on ``params`` only through the sampled — discrete, non-differentiable — actions,
whose effect is exactly what the score-function terms account for.)

* :func:`reinforce_loss`: ``-(1/B) sum_b sum_t gamma^t log pi(a_t|s_t) (G_t - b_t)`` with
  ``G_t`` the discounted reward-to-go. Its gradient is the REINFORCE estimate of ``-grad J``,
  ``J = E[sum_t gamma^t r_t]``. Baselines: ``"loo"`` (leave-one-out mean of the other episodes'
  ``G_t``; unbiased, needs ``B >= 2``), ``"mean"`` (batch mean incl. itself, slightly biased),
  ``"episode"`` (the episode's own mean per-step reward times the remaining alive steps; biased,
  usable with ``B = 1``), ``"value"`` (the network's own critic head ``V(s_t)``, stop-gradient:
  state-dependent, unbiased, usable with ``B = 1``; meaningful once the value head was trained, e.g.
  by PPO), ``"none"``.
* :func:`dice_objective`: the DiCE objective (Foerster et al. 2018) with the baseline term of Mao et
  al. (2019): ``sum_t magic(sum_{t'<=t} log pi_t') gamma^t r_t + sum_t (1 - magic(log pi_t)) b_t``,
  ``magic(x) = exp(x - stop_gradient(x))``. Its value is the sampled return; its gradient is the
  same estimate as REINFORCE with the same baseline; **its Hessian is an unbiased estimate of the
  Hessian of J** (it includes the ``grad log pi grad log pi^T R`` term that ``log pi * R`` drops).
  That is what the MAML inner loop needs for a correct second-order meta-gradient.
* :func:`gae`: generalised advantage estimation for PPO with ``alive`` masks.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from metarec.rl import networks
from metarec.rl.rollout import Trajectory

BASELINES = ("loo", "mean", "episode", "value", "none")
CREDITS = ("causal", "myopic")


def discounted_returns(rewards: jax.Array, alive: jax.Array, gamma: float) -> jax.Array:
    """Reward-to-go ``G_t = sum_{t'>=t} gamma^(t'-t) r_t' alive_t'`` along the last axis."""
    r = jnp.moveaxis(rewards * alive, -1, 0)

    def body(g, r_t):
        g = r_t + gamma * g
        return g, g

    _, out = jax.lax.scan(body, jnp.zeros_like(r[0]), r, reverse=True)
    return jnp.moveaxis(out, 0, -1)


def _baseline(
    values: jax.Array,
    alive: jax.Array,
    rewards: jax.Array,
    kind: str,
    state_value: jax.Array | None = None,
) -> jax.Array:
    """Baseline for per-step targets ``values [B, T]`` (see the module docstring). ``state_value
    [B, T]``: the critic's prediction of ``values`` (needed by ``"value"`` only)."""
    if kind not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {kind!r}")
    b = values.shape[0]
    if kind == "none":
        return jnp.zeros_like(values)
    if kind == "value":
        if state_value is None:
            raise ValueError("baseline='value' needs the critic's state values")
        return state_value * alive
    if kind == "loo":
        if b < 2:
            raise ValueError(
                "baseline='loo' needs at least 2 episodes per batch; use 'episode' or 'none'"
            )
        return (jnp.sum(values, 0, keepdims=True) - values) / (b - 1)
    if kind == "mean":
        return jnp.broadcast_to(jnp.mean(values, 0, keepdims=True), values.shape)
    # "episode": own mean reward per alive step times the number of remaining alive steps.
    steps = jnp.maximum(jnp.sum(alive, -1, keepdims=True), 1.0)
    rate = jnp.sum(rewards * alive, -1, keepdims=True) / steps
    remaining = jnp.cumsum(alive[..., ::-1], -1)[..., ::-1]
    return rate * remaining


def reinforce_loss(
    params, apply_fn: Callable, traj: Trajectory, gamma: float = 1.0, baseline: str = "loo"
) -> jax.Array:
    """REINFORCE-with-baseline surrogate loss (scalar) for ``traj`` leaves ``[B, T, ...]``."""
    logp, value, _ = networks.log_probs(apply_fn, params, traj.obs, traj.action)
    g = discounted_returns(traj.reward, traj.alive, gamma)
    adv = jax.lax.stop_gradient(g - _baseline(g, traj.alive, traj.reward, baseline, value))
    disc = gamma ** jnp.arange(traj.reward.shape[-1], dtype=jnp.float32)
    return -jnp.mean(jnp.sum(disc * logp * adv * traj.alive, -1))


def magic_box(x: jax.Array) -> jax.Array:
    """DiCE's MagicBox: evaluates to 1, derivative ``magic_box(x) * grad x`` to every order."""
    return jnp.exp(x - jax.lax.stop_gradient(x))


def dice_objective(
    params,
    apply_fn: Callable,
    traj: Trajectory,
    gamma: float = 1.0,
    baseline: str = "loo",
    credit: str = "causal",
) -> jax.Array:
    """DiCE objective with baseline (scalar, to be *maximised*) for ``traj`` ``[B, T, ...]``.

    ``credit="causal"`` (the DiCE estimator of the return): every reward is credited to all the
    actions before it. ``credit="myopic"``: every reward only to its own action
    (``magic(log pi_t) gamma^t r_t``), i.e. the gradient ``sum_t grad log pi_t (gamma^t r_t - b_t)``
    of a contextual bandit that ignores the actions' effect on later states: biased for the return,
    but without the noise of the later rewards, which swamps one item's click in a single episode.
    The ``"episode"`` baseline is then the episode's mean reward per step (times ``gamma^t``);
    ``"value"`` is causal only.
    """
    if credit not in CREDITS:
        raise ValueError(f"credit must be one of {CREDITS}, got {credit!r}")
    logp, value, _ = networks.log_probs(apply_fn, params, traj.obs, traj.action)
    logp = logp * traj.alive
    disc = gamma ** jnp.arange(traj.reward.shape[-1], dtype=jnp.float32)
    dr = disc * traj.reward * traj.alive
    if credit == "myopic":
        if baseline == "value":
            raise ValueError(
                "credit='myopic' has no critic baseline; use 'episode', 'loo', 'mean' or 'none'"
            )
        if baseline == "episode":
            steps = jnp.maximum(jnp.sum(traj.alive, -1, keepdims=True), 1.0)
            b = disc * jnp.sum(traj.reward * traj.alive, -1, keepdims=True) / steps
        else:
            b = _baseline(dr, traj.alive, dr, baseline)
        b = jax.lax.stop_gradient(b * traj.alive)
        m = magic_box(logp)
        return jnp.mean(jnp.sum(m * dr + (1.0 - m) * b, -1))
    causal = jnp.cumsum(logp, -1)
    main = jnp.sum(magic_box(causal) * dr, -1)
    # Baseline for the discounted (by gamma^t', absolute) reward-to-go sum_{t'>=t} gamma^t' r_t'.
    togo = jnp.cumsum(dr[..., ::-1], -1)[..., ::-1]
    # (the critic predicts the relative reward-to-go G_t, so its baseline for gamma^t G_t is
    # gamma^t V(s_t))
    b = jax.lax.stop_gradient(_baseline(togo, traj.alive, dr, baseline, disc * value))
    base = jnp.sum((1.0 - magic_box(logp)) * b * traj.alive, -1)
    return jnp.mean(main + base)


def dice_loss(
    params,
    apply_fn: Callable,
    traj: Trajectory,
    gamma: float = 1.0,
    baseline: str = "loo",
    credit: str = "causal",
) -> jax.Array:
    """``-dice_objective``: the inner-loop loss of MAML-RL."""
    return -dice_objective(params, apply_fn, traj, gamma, baseline, credit)


def gae(rewards: jax.Array, values: jax.Array, alive: jax.Array, gamma: float, lam: float):
    """GAE(gamma, lambda) advantages and value targets along the last (time) axis.

    The value after the last alive step is 0 (the user left, or the horizon was reached — the step
    fraction is in the observation, so the horizon is part of the state). Masked steps get 0.
    """
    r = jnp.moveaxis(rewards * alive, -1, 0)
    v = jnp.moveaxis(values * alive, -1, 0)
    al = jnp.moveaxis(alive, -1, 0)
    v_next = jnp.concatenate([v[1:], jnp.zeros_like(v[:1])], 0)
    al_next = jnp.concatenate([al[1:], jnp.zeros_like(al[:1])], 0)
    delta = (r + gamma * v_next * al_next - v) * al

    def body(a, x):
        d, an = x
        a = d + gamma * lam * an * a
        return a, a

    _, adv = jax.lax.scan(body, jnp.zeros_like(r[0]), (delta, al_next), reverse=True)
    adv = adv * al
    return jnp.moveaxis(adv, 0, -1), jnp.moveaxis(adv + v, 0, -1)
