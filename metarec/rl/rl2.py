"""An RL²-style in-context policy: a GRU over the user's (item representation, click) history,
carried across episodes, meta-trained across users with REINFORCE (Duan et al., 2016).

Unlike the meta-learned bandit (:mod:`metarec.rl.meta_bandit`), nothing in the per-user update is
hand-made: the memory is a GRU state ``h`` and its update rule is learned. After every shown item
``a`` (every *examined* slate position) with click ``c``:

    h <- GRU(h, [x_a, c x_a, c])

and the policy is a softmax over ``s_i = prior_i + x_i . (W h + w0)`` at temperature ``temp``: the
GRU state is read out as a user vector over item representations. Meta-parameters: ``feats [I, D]``
(init: the bandits' features, intercept + standardised recommender-side MF factors), ``prior [I]``
(init: the bandits' MF prior), the GRU, the read-out ``W`` (init 0, so training starts from the
prior's softmax), ``w0``, ``h0`` and ``log_temp``. The state is carried within and across episodes
exactly as the meta-bandit's, so evaluation (:func:`metarec.rl.evaluate.in_context_agent`) and
meta-training (:func:`metarec.rl.meta_bandit.make_trainer`: trials of ``trial_episodes``
consecutive episodes per user, REINFORCE through the whole trial with a leave-one-out baseline,
``log pi`` differentiated through the GRU state) are shared.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from metarec.rl import meta_bandit, networks
from metarec.rl.loop import Trainer


@dataclasses.dataclass(frozen=True)
class RL2Config:
    """RL² settings: the memory's size, the initial temperature and the meta-training loop's
    (the fields of :class:`metarec.rl.meta_bandit.MetaBanditConfig`'s loop)."""

    hidden: int = 32
    temperature: float = 0.05
    trial_episodes: int = 2
    trials: int = 4
    gamma: float = 0.9
    meta_batch: int = 32
    meta_lr: float = 3e-3
    num_iterations: int = 400
    max_grad_norm: float = 1.0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and what is allowed."""
        checks = [
            ("hidden", self.hidden >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0"),
        ]
        meta_bandit.check_fields(self, checks + meta_bandit.loop_checks(self))


def initial_params(items: dict, config: RL2Config, key=None) -> dict:
    """Meta-parameters: the bandits' item features and prior, a random GRU (seeded by ``key``,
    default ``PRNGKey(0)``), a zero read-out. ``items``: :func:`metarec.rl.bandits.item_inputs`."""
    feats = jnp.asarray(items["feats"], jnp.float32)
    d, h = feats.shape[1], config.hidden
    n_in = 2 * d + 1
    key = jax.random.PRNGKey(0) if key is None else key
    k_x, k_h = jax.random.split(key)
    return {
        "feats": feats,
        "prior": jnp.asarray(items["mf"], jnp.float32),
        # update, reset and candidate gates stacked: [in, 3H], [H, 3H], [3H]
        "w_x": jax.random.normal(k_x, (n_in, 3 * h)) / math.sqrt(n_in),
        "w_h": jax.random.normal(k_h, (h, 3 * h)) / math.sqrt(h),
        "b": jnp.zeros((3 * h,), jnp.float32),
        "h0": jnp.zeros((h,), jnp.float32),
        "read": jnp.zeros((h, d), jnp.float32),
        "read0": jnp.zeros((d,), jnp.float32),
        "log_temp": jnp.asarray(math.log(config.temperature), jnp.float32),
    }


def gru(params: dict, h: jax.Array, x: jax.Array) -> jax.Array:
    """One GRU step (Cho et al., 2014) of state ``h [H]`` on input ``x [in]``."""
    n = h.shape[0]
    gx = x @ params["w_x"] + params["b"]
    gh = h @ params["w_h"]
    z = jax.nn.sigmoid(gx[:n] + gh[:n])
    r = jax.nn.sigmoid(gx[n : 2 * n] + gh[n : 2 * n])
    cand = jnp.tanh(gx[2 * n :] + r * gh[2 * n :])
    return (1 - z) * h + z * cand


def logits(params: dict, state: dict, obs: dict) -> jax.Array:
    """The policy's masked logits ``[I]``."""
    user = state["h"] @ params["read"] + params["read0"]
    s = params["prior"] + params["feats"] @ user
    return networks.masked_logits(s * jnp.exp(-params["log_temp"]), obs["action_mask"])


def update(params: dict, state: dict, action, info) -> dict:
    """One GRU step per observed item (each examined slate position in order); invalid actions
    change nothing."""
    n_items = params["prior"].shape[0]

    def observe(h, a, click, ok):
        x = params["feats"][jnp.clip(a, 0, n_items - 1)]
        new = gru(params, h, jnp.concatenate([x, click * x, click[None]]))
        return jnp.where(ok > 0, new, h)

    if action.ndim == 1:  # a slate: the examined positions, top down

        def body(h, inp):
            return observe(h, *inp), None

        h, _ = jax.lax.scan(body, state["h"], (action, info["clicks_at"], info["examined"]))
        return {"h": h}
    ok = (~info["invalid"]).astype(jnp.float32)
    return {"h": observe(state["h"], action, info["click"].astype(jnp.float32), ok)}


def make_agent_fns(
    params: dict, genres: jax.Array, slate_size: int = 1
) -> tuple[Callable, Callable, Callable]:
    """``(init, act, step_update)`` as :func:`metarec.rl.meta_bandit.make_agent_fns` (``genres``
    is unused: the memory learns what matters)."""
    del genres

    def init(key):
        del key
        return {"h": params["h0"]}

    def act(key, state, obs):
        lg = logits(params, state, obs)
        if slate_size > 1:
            a, logp = networks.sample_slate(key, lg, slate_size)
            return a, {"logp": logp}
        a = jax.random.categorical(key, lg).astype(jnp.int32)
        return a, {"logp": jax.nn.log_softmax(lg)[a]}

    def step_update(state, obs, action, reward, info):
        del obs, reward
        return update(params, state, action, info)

    return init, act, step_update


def trial_loss(params: dict, key, genres: jax.Array, env_params, config: RL2Config):
    """:func:`metarec.rl.meta_bandit.trial_loss` of this agent."""
    return meta_bandit.trial_loss(params, key, genres, env_params, config, make_agent_fns)


def make_trainer(config: RL2Config) -> Trainer:
    """Meta-training (:func:`metarec.rl.meta_bandit.make_trainer` with this agent)."""
    config.validate()
    return meta_bandit.make_trainer(config, make_agent_fns)
