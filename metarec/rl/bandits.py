"""Per-user contextual-bandit baselines as one linear-bandit family with traced hyper-parameters.

Every method scores item ``i`` as ``o_i + x_i . theta`` and recommends the best valid item:

* ``x_i = feat_scale * [1, z(q_i)]``: an intercept and the standardised item factors ``q_i`` of the
  *recommender-side* MF (fitted on training ratings, independent of the simulator's MF);
* ``o_i = w_mf * 0.1 * z(mf score_i) + w_pop * 0.1 * z(log(1 + popularity_i))``: a prior score;
* ``theta`` is the user's ridge estimate ``A^-1 b`` with ``A = lam I + sum x x^T`` (``lam``: the
  ridge, i.e. the prior's precision) and
  ``b = sum x (click - o)``, updated after **every** interaction (bandits learn online, also within
  an episode);
* ``alpha > 0`` adds the LinUCB bonus ``alpha sqrt(x^T A^-1 x)``; ``ts > 0`` replaces ``theta`` by a
  Thompson sample ``theta + ts * chol(A^-1) z``; ``eps > 0`` explores uniformly with probability
  eps.

Slates (``slate_size = k > 1``): every method shows its ``k`` best-scored valid items in order (a
random slate when it explores) and updates on every *examined* position, with the position's click
or no-click, as CascadeLinUCB does (Zong et al., 2016): under the cascade model the positions below
a click or below where the user stopped were not seen, so they say nothing about the user.

So the named baselines are just settings (see :data:`METHODS`): ``random`` (eps = 1), ``popular``
(popularity prior, no learning), ``mf_greedy`` (greedy on the MF scores, user vector folded in from
clicks), ``egreedy``, ``linucb``, ``thompson``. Because all are one function of a hyper-parameter
pytree, one compilation evaluates them all (``vmap`` over methods).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metarec.rl import networks

#: method -> hyper-parameters (w_mf, w_pop, feat_scale, alpha, ts, eps, lam), the classic values
METHODS = {
    "random": dict(w_mf=0.0, w_pop=0.0, feat_scale=0.0, alpha=0.0, ts=0.0, eps=1.0, lam=1.0),
    "popular": dict(w_mf=0.0, w_pop=1.0, feat_scale=0.0, alpha=0.0, ts=0.0, eps=0.0, lam=1.0),
    "mf_greedy": dict(w_mf=1.0, w_pop=0.0, feat_scale=1.0, alpha=0.0, ts=0.0, eps=0.0, lam=1.0),
    "egreedy": dict(w_mf=1.0, w_pop=0.0, feat_scale=1.0, alpha=0.0, ts=0.0, eps=0.1, lam=1.0),
    "linucb": dict(w_mf=1.0, w_pop=0.0, feat_scale=1.0, alpha=0.5, ts=0.0, eps=0.0, lam=1.0),
    "thompson": dict(w_mf=1.0, w_pop=0.0, feat_scale=1.0, alpha=0.0, ts=0.5, eps=0.0, lam=1.0),
}
#: the constants a method's own setting may override (what distinguishes it: its exploration and
#: its ridge), with the values allowed
TUNABLE = {
    "mf_greedy": ("lam",),
    "egreedy": ("lam", "eps"),
    "linucb": ("lam", "alpha"),
    "thompson": ("lam", "ts"),
}


def _z(x):
    x = np.asarray(x, np.float64)
    s = x.std(0)
    return ((x - x.mean(0)) / np.where(s > 0, s, 1.0)).astype(np.float32)


def item_inputs(agent_item_factors, agent_item_score, popularity) -> dict:
    """Host-side item features for the family: ``feats [I, 1 + k]``, ``mf [I]``, ``pop [I]``."""
    f = np.asarray(agent_item_factors, np.float32)
    feats = np.concatenate([np.ones((f.shape[0], 1), np.float32), _z(f) if f.shape[1] else f], 1)
    return {
        "feats": jnp.asarray(feats),
        "mf": jnp.asarray(0.1 * _z(agent_item_score)),
        "pop": jnp.asarray(0.1 * _z(np.log1p(np.asarray(popularity, np.float64)))),
    }


def settings(names, overrides: dict | None = None) -> dict:
    """``{name: hyper-parameters}`` of methods ``names``: :data:`METHODS` with ``overrides``
    (``{name: {constant: value}}``, constants of :data:`TUNABLE`) applied. Raises ``ValueError``
    naming a bad method, constant or value."""
    overrides = overrides or {}
    out = {}
    for n in names:
        if n not in METHODS:
            raise ValueError(f"unknown bandit method {n!r}; allowed: {sorted(METHODS)}")
        out[n] = dict(METHODS[n])
    for n, consts in overrides.items():
        if n not in TUNABLE:
            raise ValueError(f"bandit {n!r} has no tunable constants; tunable: {sorted(TUNABLE)}")
        for k, v in consts.items():
            if k not in TUNABLE[n]:
                raise ValueError(f"bandit {n!r}: constant {k!r} not tunable; allowed: {TUNABLE[n]}")
            ok = 0 <= v <= 1 if k == "eps" else (v > 0 if k == "lam" else v >= 0)
            if not ok:
                allowed = {"eps": "in [0, 1]", "lam": "> 0"}.get(k, ">= 0")
                raise ValueError(f"bandit {n!r}: {k}={v!r} is invalid: must be {allowed}")
            if n in out:
                out[n][k] = float(v)
    return out


def hyper_params(names, overrides: dict | None = None) -> dict:
    """Stack the hyper-parameters of methods ``names`` (:func:`settings`) into arrays
    ``[len(names)]``."""
    per = settings(names, overrides)
    return {k: jnp.asarray([per[n][k] for n in names], jnp.float32) for k in METHODS["random"]}


def init(items: dict, hp: dict) -> dict:
    """A fresh per-user bandit state (``hp`` holds one method's scalars; ``A = lam I``)."""
    d = items["feats"].shape[1]
    return {"A": hp["lam"] * jnp.eye(d), "b": jnp.zeros(d), "hp": hp, "items": items}


def _scores(key, state):
    hp, items = state["hp"], state["items"]
    x = items["feats"] * hp["feat_scale"]
    prior = hp["w_mf"] * items["mf"] + hp["w_pop"] * items["pop"]
    a_inv = jnp.linalg.inv(state["A"])
    a_inv = 0.5 * (a_inv + a_inv.T)
    theta = a_inv @ state["b"]
    chol = jnp.linalg.cholesky(a_inv + 1e-6 * jnp.eye(a_inv.shape[0]))
    theta = theta + hp["ts"] * chol @ jax.random.normal(key, theta.shape)
    bonus = hp["alpha"] * jnp.sqrt(jnp.maximum(jnp.einsum("id,de,ie->i", x, a_inv, x), 0.0))
    return prior + x @ theta + bonus


def act(key, state, obs):
    """Choose an item (``act_fn`` of :func:`metarec.rl.rollout.rollout`)."""
    k_ts, k_eps, k_rand = jax.random.split(key, 3)
    mask = obs["action_mask"]
    greedy = jnp.argmax(networks.masked_logits(_scores(k_ts, state), mask))
    rand = jax.random.categorical(k_rand, networks.masked_logits(jnp.zeros_like(mask), mask))
    explore = jax.random.uniform(k_eps) < state["hp"]["eps"]
    return jnp.where(explore, rand, greedy).astype(jnp.int32), {}


def slate_act(slate_size: int):
    """``act`` for slates of ``slate_size`` items: the best-scored valid items in order, or (with
    probability eps) a uniformly random slate."""

    def act(key, state, obs):
        k_ts, k_eps, k_rand = jax.random.split(key, 3)
        mask = obs["action_mask"]
        greedy = jax.lax.top_k(networks.masked_logits(_scores(k_ts, state), mask), slate_size)[1]
        noise = jax.random.gumbel(k_rand, mask.shape)
        rand = jax.lax.top_k(networks.masked_logits(noise, mask), slate_size)[1]
        explore = jax.random.uniform(k_eps) < state["hp"]["eps"]
        return jnp.where(explore, rand, greedy).astype(jnp.int32), {}

    return act


def update(state, obs, action, reward, info):
    """Ridge update with the observed click (``update_fn`` of the rollout); invalid actions skip.
    A slate ``action [k]`` updates on each examined position (``info["examined"]``) with its
    click."""
    del obs, reward
    hp, items = state["hp"], state["items"]
    a = jnp.clip(action, 0, items["feats"].shape[0] - 1)
    x = items["feats"][a] * hp["feat_scale"]
    prior = hp["w_mf"] * items["mf"][a] + hp["w_pop"] * items["pop"][a]
    if action.ndim == 1:  # a slate
        w = info["examined"]
        return {
            **state,
            "A": state["A"] + jnp.einsum("k,kd,ke->de", w, x, x),
            "b": state["b"] + (w * (info["clicks_at"] - prior)) @ x,
        }
    ok = (~info["invalid"]).astype(jnp.float32)
    return {
        **state,
        "A": state["A"] + ok * jnp.outer(x, x),
        "b": state["b"] + ok * x * (info["click"] - prior),
    }
