"""Policy / Q-networks over items, and the actors built from them.

A network is used through a pair of pure functions ``init(key) -> params`` and
``apply(params, obs) -> (scores [..., I], value [...])``; ``obs`` may carry any leading batch axes.
The same scorer serves as a policy (``softmax`` over masked scores), an actor-critic (``value``) and
a Q-network (``scores`` = Q(s, a) for every item a).

:class:`ItemScorer` encodes the history: every shown item's embedding is concatenated with the
embedding signed by the response (``+e`` for a click, ``-e`` for a skip), masked-mean-pooled, joined
with the step fraction and the click rate so far, and passed through an MLP to a user vector ``u``;
the score of item ``i`` is ``u . w_i + b_i`` (separate output item embeddings and biases). Item
biases let a policy memorise "popular" items; ``u`` lets it react to the current user's feedback
within an episode; gradient adaptation of all parameters lets it specialise to one user.

Slates: a softmax policy ranks ``k`` items by sampling without replacement (Plackett-Luce: the
first item from the softmax, the next from the softmax over the rest, ...; drawn at once as the
top ``k`` of Gumbel-perturbed logits), so its log-probability, and every policy-gradient loss built
on it, stays exact; a greedy actor shows the top ``k`` scores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

NEG = -1e9  # finite "minus infinity" for masked logits (keeps gradients NaN-free)


class ItemScorer(nn.Module):
    """History encoder + per-item scores and a state value (see the module docstring)."""

    n_items: int
    embed_dim: int = 16
    hidden: int = 32

    @nn.compact
    def __call__(self, obs):
        emb = nn.Embed(self.n_items + 1, self.embed_dim, name="item_in")(obs["items"])
        sign = (2.0 * obs["responses"] - 1.0)[..., None]
        x = jnp.concatenate([emb, emb * sign], -1)
        m = obs["hist_mask"][..., None]
        count = jnp.sum(m, -2)
        pooled = jnp.sum(x * m, -2) / jnp.maximum(count, 1.0)
        click_rate = jnp.sum(obs["responses"] * obs["hist_mask"], -1, keepdims=True) / jnp.maximum(
            count, 1.0
        )
        feats = jnp.concatenate([pooled, obs["step"][..., None], click_rate], -1)
        h = nn.tanh(nn.Dense(self.hidden, name="hidden")(feats))
        u = nn.Dense(self.embed_dim, name="user")(h)
        w = self.param("item_out", nn.initializers.normal(0.1), (self.n_items, self.embed_dim))
        b = self.param("item_bias", nn.initializers.zeros, (self.n_items,))
        scores = u @ w.T + b
        value = nn.Dense(1, name="value")(h)[..., 0]
        return scores, value


class Network(NamedTuple):
    """``init(key) -> params``; ``apply(params, obs) -> (scores, value)``."""

    init: Callable
    apply: Callable


def dummy_obs(n_items: int, history_len: int) -> dict:
    """An observation with the right shapes (for ``init``)."""
    return {
        "items": jnp.full((history_len,), n_items, jnp.int32),
        "responses": jnp.zeros((history_len,), jnp.float32),
        "hist_mask": jnp.zeros((history_len,), jnp.float32),
        "step": jnp.zeros((), jnp.float32),
        "action_mask": jnp.ones((n_items,), jnp.float32),
    }


def make_item_scorer(
    n_items: int, history_len: int, embed_dim: int = 16, hidden: int = 32
) -> Network:
    """An :class:`ItemScorer` as a :class:`Network` of pure functions."""
    module = ItemScorer(n_items=n_items, embed_dim=embed_dim, hidden=hidden)

    def init(key):
        return module.init(key, dummy_obs(n_items, history_len))["params"]

    def apply(params, obs):
        return module.apply({"params": params}, obs)

    return Network(init, apply)


def make_tabular(n_items: int, init_logits=None) -> Network:
    """A state-independent softmax policy with one logit per item (for bandit checks); value 0."""

    def init(key):
        del key
        logits = (
            jnp.zeros((n_items,), jnp.float32)
            if init_logits is None
            else jnp.asarray(init_logits, jnp.float32)
        )
        return {"logits": logits}

    def apply(params, obs):
        batch = obs["step"].shape
        return jnp.broadcast_to(params["logits"], batch + (n_items,)), jnp.zeros(batch, jnp.float32)

    return Network(init, apply)


def masked_logits(scores: jax.Array, action_mask: jax.Array) -> jax.Array:
    """Scores with invalid / already-shown items set to a large negative number."""
    return jnp.where(action_mask > 0, scores, NEG)


def slate_log_prob(logits: jax.Array, slate: jax.Array) -> jax.Array:
    """Plackett-Luce log-probability ``[...]`` of ranked slates ``[..., k]`` under ``logits
    [..., I]``: the sum over positions of the log-softmax of the chosen item among the items not
    chosen above it."""
    slate = slate.astype(jnp.int32)
    chosen = jnp.take_along_axis(logits, slate, -1)
    picked = jax.nn.one_hot(slate, logits.shape[-1], dtype=jnp.int32)  # [..., k, I]
    above = jnp.cumsum(picked, -2) - picked
    lse = jax.nn.logsumexp(jnp.where(above > 0, NEG, logits[..., None, :]), -1)
    return jnp.sum(chosen - lse, -1)


def sample_slate(key: jax.Array, logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """A Plackett-Luce draw of ``k`` items (the top ``k`` of Gumbel-perturbed ``logits [I]``) and
    its log-probability."""
    slate = jax.lax.top_k(logits + jax.random.gumbel(key, logits.shape), k)[1].astype(jnp.int32)
    return slate, slate_log_prob(logits, slate)


def log_probs(apply_fn: Callable, params, obs, actions) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(log pi(a|s), value(s), entropy(s))`` for batched observations and actions (slates
    ``[..., k]``: the Plackett-Luce log-probability; the entropy is the top position's)."""
    scores, value = apply_fn(params, obs)
    logits = masked_logits(scores, obs["action_mask"])
    logp_all = jax.nn.log_softmax(logits, -1)
    if actions.ndim == logits.ndim:
        logp = slate_log_prob(logits, actions)
    else:
        logp = jnp.take_along_axis(logp_all, actions[..., None].astype(jnp.int32), -1)[..., 0]
    p_all = jnp.exp(logp_all)
    entropy = -jnp.sum(jnp.where(obs["action_mask"] > 0, p_all * logp_all, 0.0), -1)
    return logp, value, entropy


def sample_actor(apply_fn: Callable, params, slate_size: int = 1) -> Callable:
    """Actor sampling from the softmax policy (slates: Plackett-Luce); extras ``logp``,
    ``value``."""

    def act(key, agent_state, obs):
        del agent_state
        scores, value = apply_fn(params, obs)
        logits = masked_logits(scores, obs["action_mask"])
        if slate_size > 1:
            a, logp = sample_slate(key, logits, slate_size)
            return a, {"logp": logp, "value": value}
        a = jax.random.categorical(key, logits).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits)[a]
        return a, {"logp": logp, "value": value}

    return act


def greedy_actor(apply_fn: Callable, params, slate_size: int = 1) -> Callable:
    """Actor taking ``argmax`` of the masked scores (the DQN recommendation, or a greedy policy);
    slates: the ``slate_size`` best in order."""

    def act(key, agent_state, obs):
        del key, agent_state
        scores, _ = apply_fn(params, obs)
        logits = masked_logits(scores, obs["action_mask"])
        if slate_size > 1:
            return jax.lax.top_k(logits, slate_size)[1].astype(jnp.int32), {}
        return jnp.argmax(logits).astype(jnp.int32), {}

    return act


def epsilon_greedy_actor(apply_fn: Callable, params, epsilon) -> Callable:
    """With probability ``epsilon`` a uniformly random valid item, else ``argmax`` of the scores."""

    def act(key, agent_state, obs):
        del agent_state
        k1, k2 = jax.random.split(key)
        scores, _ = apply_fn(params, obs)
        greedy = jnp.argmax(masked_logits(scores, obs["action_mask"]))
        rand = jax.random.categorical(k2, masked_logits(jnp.zeros_like(scores), obs["action_mask"]))
        a = jnp.where(jax.random.uniform(k1) < epsilon, rand, greedy).astype(jnp.int32)
        return a, {}

    return act
