"""A pure-functional recommendation environment in the gymnax style.

One *user* is one environment: its :class:`EnvParams` (a ``flax.struct`` dataclass pytree) holds the
user's affinity for every catalogue item plus the dynamics constants, and :class:`EnvState` holds
the session so far. Both are pytrees, so ``jax.vmap`` over users / seeds / episodes is free and
whole rollouts run under ``jax.jit`` with ``lax.scan``::

    obs, state = reset(key, params)
    obs, state, reward, terminated, truncated, info = step(key, state, action, params)

Where the affinities come from is not this module's business: :mod:`metarec.rl.simulator` builds
them from a biased matrix factorisation fitted on MovieLens training users (``affinity`` = predicted
rating) or from latent RecSim-style interest vectors (``affinity`` = dot product).

Dynamics (all constants are fields of :class:`EnvParams`, set through :class:`EnvConfig`):

* **Click model.** Recommending item ``i`` gives a click with probability
  ``p_i = sigmoid((affinity_i - threshold) / temperature - boredom_weight * fatigue . g_i)``, where
  ``g_i`` is item ``i``'s genre vector normalised to sum 1 (all zeros for genre-less items).
  ``threshold`` is the affinity at which a fresh user clicks half the time, ``temperature`` how
  sharp the link is.
* **Reward.** ``click * click_reward_i``; ``click_reward`` is 1 for "reward = click" and the
  (rescaled) rating for "reward = rating" (see the simulator). Penalties below are subtracted.
* **Satiation / boredom.** ``fatigue <- boredom_decay * fatigue + g_a`` after every shown item
  ``a``, so showing the same genres again and again lowers their click probabilities.
* **No repeats.** An item already shown in this episode never clicks again and costs
  ``repeat_penalty``. The observation's ``action_mask`` marks such items so policies can mask them.
* **Leaving.** After a step, ``unrewarded`` counts consecutive steps without a click (reset by a
  click). The user leaves (``terminated``) with probability
  ``clip(leave_base + leave_growth * unrewarded, 0, 1)``.
* **Horizon.** ``truncated`` is True when the step count reaches ``horizon`` and the user did not
  leave on that step. ``terminated`` and ``truncated`` are never both True.
* **Invalid actions** (index out of ``[0, n_items)``, or an item with ``item_mask == 0``) are not an
  error: they are treated as a no-click step with reward ``-invalid_penalty`` that counts as an
  unrewarded step (so it raises the leave probability) and is not written to the history.
* **After the episode ended** (``state.done``) ``step`` is a no-op: same state, reward 0, both flags
  False. This lets rollouts run a fixed ``horizon`` steps with ``lax.scan`` and mask with ``alive``.

Slates (``slate_size = k > 1``): an action is ``int32 [k]``, a ranked list. The user scans it top
down (**cascade click model**): the top item is examined; an examined item is clicked with its click
probability ``p_j`` above; a click ends the scan, otherwise the user goes on to the next position
with probability ``examine_decay`` (**position bias**: position ``j`` is examined with probability
``examine_decay^j prod_{l<j} (1 - p_l)``). So a slate gives at most one click, and
``P(click) = sum_j examine_decay^j prod_{l<j} (1 - p_l) p_j``. Every valid item of the slate is
shown (``consumed``: it never clicks again, **no repeats**; an item twice in one slate is a repeat
from its second position on); the examined ones add to the fatigue and all shown ones enter the
history with their click. The oracle shows the ``k`` items of highest expected reward in decreasing
order, which maximises the expected reward of a slate for ``reward = click`` (an exchange argument:
swapping adjacent items ``p_a > p_b`` changes it by ``(p_a - p_b)(1 - examine_decay) >= 0`` times a
positive factor). ``info`` then also holds ``clicks_at [k]``, ``examined [k]`` (examined valid
positions) and ``ndcg``: the slate's DCG of the true click probabilities (discount
``1 / log2(position + 2)``) over the best possible slate's.

Observation (a dict): ``items [L] int32`` (last ``L = history_len`` shown items, most recent last,
padding = ``n_items``), ``responses [L] float32`` (1 click / 0 no click / 0 padding),
``hist_mask [L]`` (1 real), ``step`` (float, ``t / horizon``), ``action_mask [n_items]`` (1 = valid,
not yet shown).

``info`` carries ``click``, ``click_prob`` (of the chosen item), ``expected_reward`` (of the chosen
action, penalties included), ``best_expected_reward`` (the oracle's: best available item in the
current state), ``invalid`` and ``repeat`` — everything needed for regret.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """Dynamics constants shared by all users of an experiment (see the module docstring)."""

    horizon: int = 20
    history_len: int = 10
    threshold: float = 3.5
    temperature: float = 0.5
    boredom_weight: float = 1.0
    boredom_decay: float = 0.8
    leave_base: float = 0.0
    leave_growth: float = 0.1
    repeat_penalty: float = 0.0
    invalid_penalty: float = 1.0
    slate_size: int = 1
    examine_decay: float = 1.0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field and what is allowed."""
        checks = [
            ("horizon", self.horizon >= 1, "an integer >= 1"),
            ("history_len", self.history_len >= 1, "an integer >= 1"),
            ("temperature", self.temperature > 0 and math.isfinite(self.temperature), "finite > 0"),
            ("threshold", math.isfinite(self.threshold), "finite"),
            ("boredom_weight", self.boredom_weight >= 0, ">= 0"),
            ("boredom_decay", 0 <= self.boredom_decay <= 1, "in [0, 1]"),
            ("leave_base", 0 <= self.leave_base <= 1, "in [0, 1]"),
            ("leave_growth", self.leave_growth >= 0, ">= 0"),
            ("repeat_penalty", self.repeat_penalty >= 0, ">= 0"),
            ("invalid_penalty", self.invalid_penalty >= 0, ">= 0"),
            ("slate_size", self.slate_size >= 1, "an integer >= 1"),
            ("examine_decay", 0 < self.examine_decay <= 1, "in (0, 1]"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(
                    f"EnvConfig.{name}={getattr(self, name)!r} is invalid: must be {allowed}"
                )


@flax.struct.dataclass
class EnvParams:
    """One user's environment (or a batch of users with a leading axis on every array leaf).

    ``affinity [I]``: the user's affinity for each item (predicted rating or latent dot product).
    ``click_reward [I]``: reward of a click on each item. ``item_genres [I, G]``: genre vectors,
    rows normalised to sum 1 (or 0). ``item_mask [I]``: 1.0 for recommendable items.
    Scalars: see :class:`EnvConfig`. ``horizon``, ``history_len``, ``slate_size`` and
    ``examine_decay`` are static (not traced): they fix shapes and the kind of step.
    """

    affinity: jax.Array
    click_reward: jax.Array
    item_genres: jax.Array
    item_mask: jax.Array
    threshold: jax.Array
    temperature: jax.Array
    boredom_weight: jax.Array
    boredom_decay: jax.Array
    leave_base: jax.Array
    leave_growth: jax.Array
    repeat_penalty: jax.Array
    invalid_penalty: jax.Array
    horizon: int = flax.struct.field(pytree_node=False, default=20)
    history_len: int = flax.struct.field(pytree_node=False, default=10)
    slate_size: int = flax.struct.field(pytree_node=False, default=1)
    examine_decay: float = flax.struct.field(pytree_node=False, default=1.0)

    @property
    def n_items(self) -> int:
        return self.affinity.shape[-1]

    @property
    def n_genres(self) -> int:
        return self.item_genres.shape[-1]


@flax.struct.dataclass
class EnvState:
    """A user's session: step count, history ring (most recent last), shown items, genre fatigue,
    consecutive unrewarded steps and whether the episode has ended."""

    t: jax.Array
    hist_items: jax.Array
    hist_responses: jax.Array
    hist_mask: jax.Array
    consumed: jax.Array
    fatigue: jax.Array
    unrewarded: jax.Array
    done: jax.Array


def make_env_params(
    affinity,
    item_genres,
    config: EnvConfig = EnvConfig(),
    click_reward=None,
    item_mask=None,
) -> EnvParams:
    """Validate inputs and build :class:`EnvParams` for one user (``affinity [I]``) or a batch of
    users (``affinity [U, I]``; ``item_genres`` ``[I, G]`` is then shared and broadcast).

    ``click_reward`` defaults to 1 (reward = click); ``item_mask`` to all ones. Genre rows are
    normalised to sum 1. Raises ``ValueError`` naming the argument on bad shapes or values.
    """
    config.validate()
    affinity = np.asarray(affinity, np.float32)
    if affinity.ndim not in (1, 2):
        raise ValueError(
            f"affinity must be [n_items] or [n_users, n_items], got shape {affinity.shape}"
        )
    if not np.all(np.isfinite(affinity)):
        raise ValueError("affinity contains non-finite values")
    n_items = affinity.shape[-1]
    if n_items < 1:
        raise ValueError("affinity must have at least one item")
    item_genres = np.asarray(item_genres, np.float32)
    if item_genres.ndim != 2 or item_genres.shape[0] != n_items:
        raise ValueError(
            f"item_genres must be [n_items={n_items}, n_genres], got {item_genres.shape}"
        )
    if np.any(item_genres < 0):
        raise ValueError("item_genres must be non-negative (multi-hot or weights)")
    rows = item_genres.sum(-1, keepdims=True)
    item_genres = np.where(rows > 0, item_genres / np.maximum(rows, 1e-12), 0.0).astype(np.float32)
    click_reward = (
        np.ones_like(affinity) if click_reward is None else np.asarray(click_reward, np.float32)
    )
    if click_reward.shape != affinity.shape or not np.all(np.isfinite(click_reward)):
        raise ValueError(
            f"click_reward must be finite with shape {affinity.shape}, got {click_reward.shape}"
        )
    item_mask = (
        np.ones(n_items, np.float32) if item_mask is None else np.asarray(item_mask, np.float32)
    )
    if item_mask.shape[-1] != n_items or not np.all((item_mask == 0) | (item_mask == 1)):
        raise ValueError(f"item_mask must be 0/1 with last dimension {n_items}")
    if not np.all(item_mask.reshape(-1, n_items).sum(-1) >= 1):
        raise ValueError("item_mask must leave at least one recommendable item")
    batch = affinity.shape[:-1]
    item_mask = np.broadcast_to(item_mask, affinity.shape).astype(np.float32)
    item_genres = np.broadcast_to(item_genres, batch + item_genres.shape).astype(np.float32)

    def scalar(v):
        return jnp.full(batch, v, jnp.float32)

    return EnvParams(
        affinity=jnp.asarray(affinity),
        click_reward=jnp.asarray(click_reward),
        item_genres=jnp.asarray(item_genres),
        item_mask=jnp.asarray(item_mask),
        threshold=scalar(config.threshold),
        temperature=scalar(config.temperature),
        boredom_weight=scalar(config.boredom_weight),
        boredom_decay=scalar(config.boredom_decay),
        leave_base=scalar(config.leave_base),
        leave_growth=scalar(config.leave_growth),
        repeat_penalty=scalar(config.repeat_penalty),
        invalid_penalty=scalar(config.invalid_penalty),
        horizon=int(config.horizon),
        history_len=int(config.history_len),
        slate_size=int(config.slate_size),
        examine_decay=float(config.examine_decay),
    )


def index_params(params: EnvParams, idx) -> EnvParams:
    """Select users ``idx`` from batched params (works under jit with a traced ``idx``)."""
    return jax.tree_util.tree_map(lambda a: a[idx], params)


def num_users(params: EnvParams) -> int:
    """Number of users along the leading axis of batched params."""
    return params.affinity.shape[0]


def reset(key: jax.Array, params: EnvParams) -> tuple[dict, EnvState]:
    """Start a session: empty history, nothing shown, no fatigue. ``key`` is unused (the start is
    deterministic) but kept for the gymnax signature."""
    del key
    n_items, length = params.n_items, params.history_len
    state = EnvState(
        t=jnp.zeros((), jnp.int32),
        hist_items=jnp.full((length,), n_items, jnp.int32),
        hist_responses=jnp.zeros((length,), jnp.float32),
        hist_mask=jnp.zeros((length,), jnp.float32),
        consumed=jnp.zeros((n_items,), jnp.float32),
        fatigue=jnp.zeros((params.n_genres,), jnp.float32),
        unrewarded=jnp.zeros((), jnp.int32),
        done=jnp.zeros((), jnp.bool_),
    )
    return get_obs(state, params), state


def get_obs(state: EnvState, params: EnvParams) -> dict:
    """The observation of ``state`` (see the module docstring)."""
    return {
        "items": state.hist_items,
        "responses": state.hist_responses,
        "hist_mask": state.hist_mask,
        "step": state.t.astype(jnp.float32) / params.horizon,
        "action_mask": params.item_mask * (1.0 - state.consumed),
    }


def click_probs(state: EnvState, params: EnvParams) -> jax.Array:
    """Click probability of every item in ``state`` ignoring repeats/masks, ``[n_items]``."""
    logits = (params.affinity - params.threshold) / params.temperature
    logits = logits - params.boredom_weight * (params.item_genres @ state.fatigue)
    return jax.nn.sigmoid(logits)


def expected_rewards(state: EnvState, params: EnvParams) -> jax.Array:
    """Expected immediate reward of every action ``[n_items]`` in ``state``, penalties included."""
    p = click_probs(state, params)
    valid = params.item_mask > 0
    repeat = state.consumed > 0
    er = jnp.where(repeat, -params.repeat_penalty, p * params.click_reward)
    return jnp.where(valid, er, -params.invalid_penalty)


def oracle_action(state: EnvState, params: EnvParams) -> jax.Array:
    """The simulator's oracle: the action with the highest expected immediate reward (for slates,
    the ``slate_size`` best items in decreasing order)."""
    er = expected_rewards(state, params)
    if params.slate_size > 1:
        return jax.lax.top_k(er, params.slate_size)[1].astype(jnp.int32)
    return jnp.argmax(er).astype(jnp.int32)


def step(key: jax.Array, state: EnvState, action, params: EnvParams):
    """Advance one step; returns ``(obs, state, reward, terminated, truncated, info)``."""
    if params.slate_size > 1:
        return _step_slate(key, state, action, params)
    n_items = params.n_items
    action = jnp.asarray(action, jnp.int32)
    k_click, k_leave = jax.random.split(key)
    in_range = (action >= 0) & (action < n_items)
    a = jnp.clip(action, 0, n_items - 1)
    valid = in_range & (params.item_mask[a] > 0)
    repeat = valid & (state.consumed[a] > 0)
    all_er = expected_rewards(state, params)
    best_er = jnp.max(all_er)
    p_all = click_probs(state, params)
    p = jnp.where(valid & ~repeat, p_all[a], 0.0)
    click = jax.random.uniform(k_click) < p
    clickf = click.astype(jnp.float32)
    reward = clickf * params.click_reward[a]
    reward = reward - jnp.where(
        valid, jnp.where(repeat, params.repeat_penalty, 0.0), params.invalid_penalty
    )
    expected = jnp.where(valid, all_er[a], -params.invalid_penalty)

    shown = valid.astype(jnp.float32)
    g = params.item_genres[a] * shown
    fatigue = jnp.where(valid, params.boredom_decay * state.fatigue + g, state.fatigue)
    consumed = state.consumed.at[a].max(shown)

    def roll(h, v):  # push v into the history (when the action was valid)
        return jnp.where(valid, jnp.concatenate([h[1:], jnp.asarray(v, h.dtype)[None]]), h)

    hist_items = roll(state.hist_items, a)
    hist_responses = roll(state.hist_responses, clickf)
    hist_mask = roll(state.hist_mask, 1.0)
    unrewarded, t, terminated, truncated = _leave(k_leave, state, click, params)

    new_state = EnvState(
        t=t,
        hist_items=hist_items,
        hist_responses=hist_responses,
        hist_mask=hist_mask,
        consumed=consumed,
        fatigue=fatigue,
        unrewarded=unrewarded,
        done=terminated | truncated,
    )
    info = {
        "click": clickf,
        "click_prob": p,
        "expected_reward": expected,
        "best_expected_reward": best_er,
        "invalid": ~valid,
        "repeat": repeat,
    }
    return _finish(state, new_state, reward, terminated, truncated, info, params)


def _leave(key, state: EnvState, click, params: EnvParams):
    """``(unrewarded, t, terminated, truncated)`` after a step with or without a click: the user
    leaves with a probability that grows with the consecutive unrewarded steps."""
    unrewarded = jnp.where(click, 0, state.unrewarded + 1)
    t = state.t + 1
    p_leave = jnp.clip(params.leave_base + params.leave_growth * unrewarded, 0.0, 1.0)
    terminated = jax.random.uniform(key) < p_leave
    truncated = (t >= params.horizon) & ~terminated
    return unrewarded, t, terminated, truncated


def _finish(state, new_state, reward, terminated, truncated, info, params):
    """After the episode ended the step is a no-op: the old state, zero reward and info."""
    alive = ~state.done
    new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(alive, n, o), new_state, state)
    zero = jnp.zeros((), jnp.float32)
    info = {
        k: (v & alive) if v.dtype == jnp.bool_ else jnp.where(alive, v, zero)
        for k, v in info.items()
    }
    info["alive"] = alive.astype(jnp.float32)
    reward = jnp.where(alive, reward, zero)
    obs = get_obs(new_state, params)
    return obs, new_state, reward, terminated & alive, truncated & alive, info


def slate_value(probs, rewards, penalty, examine_decay):
    """Expected reward of a ranked slate under the cascade model: ``probs``, ``rewards``,
    ``penalty`` ``[k]`` per position (click probability, reward of a click, cost of showing)."""
    reach = jnp.cumprod(jnp.concatenate([jnp.ones((1,)), examine_decay * (1.0 - probs[:-1])]))
    return jnp.sum(reach * probs * rewards) - jnp.sum(penalty)


def slate_ndcg(probs, available_probs, k: int):
    """nDCG of a ranked slate with the true click probabilities ``probs [k]`` as gains, against
    the best ``k`` of ``available_probs [I]`` (1 when the slate is the best one; 0 when nothing can
    be clicked)."""
    disc = 1.0 / jnp.log2(jnp.arange(k, dtype=jnp.float32) + 2.0)
    ideal = jnp.sum(jax.lax.top_k(available_probs, k)[0] * disc)
    return jnp.where(ideal > 0, jnp.sum(probs * disc) / jnp.maximum(ideal, 1e-12), 0.0)


def _slate_terms(state: EnvState, params: EnvParams, a, valid, probs):
    """Per position: ``(repeat, click probability, reward of a click, cost)`` of slate ``a``
    (``probs``: every item's click probability in ``state``)."""
    k = params.slate_size
    earlier = jnp.tril(jnp.ones((k, k), jnp.bool_), -1)
    dup = jnp.any((a[:, None] == a[None, :]) & earlier & valid[None, :], axis=1)
    repeat = valid & ((state.consumed[a] > 0) | dup)
    p = jnp.where(valid & ~repeat, probs[a], 0.0)
    cost = jnp.where(valid, jnp.where(repeat, params.repeat_penalty, 0.0), params.invalid_penalty)
    return repeat, p, params.click_reward[a], cost


def _step_slate(key: jax.Array, state: EnvState, action, params: EnvParams):
    """:func:`step` for a slate ``action [k]`` (cascade model, see the module docstring)."""
    n_items, k, decay = params.n_items, params.slate_size, params.examine_decay
    action = jnp.asarray(action, jnp.int32)
    if action.shape != (k,):
        raise ValueError(f"a slate action must have shape ({k},), got {action.shape}")
    k_click, k_exam, k_leave = jax.random.split(key, 3)
    in_range = (action >= 0) & (action < n_items)
    a = jnp.clip(action, 0, n_items - 1)
    valid = in_range & (params.item_mask[a] > 0)
    p_all = click_probs(state, params)
    repeat, p, rew, cost = _slate_terms(state, params, a, valid, p_all)
    attracted = jax.random.uniform(k_click, (k,)) < p
    goes_on = ~attracted & (jax.random.uniform(k_exam, (k,)) < decay)
    reached = jnp.cumprod(jnp.concatenate([jnp.ones((1,)), goes_on[:-1].astype(jnp.float32)]))
    clicks_at = reached * attracted
    clickf = jnp.max(clicks_at)
    click = clickf > 0
    reward = jnp.sum(clicks_at * rew) - jnp.sum(cost)
    expected = slate_value(p, rew, cost, decay)
    best = oracle_action(state, params)
    valid_best = params.item_mask[best] > 0
    _, p_best, rew_best, cost_best = _slate_terms(state, params, best, valid_best, p_all)
    best_er = slate_value(p_best, rew_best, cost_best, decay)
    open_items = (params.item_mask > 0) & (state.consumed == 0)
    ndcg = slate_ndcg(p, jnp.where(open_items, p_all, 0.0), k)

    shown = valid.astype(jnp.float32)
    seen = reached * shown
    fatigue = params.boredom_decay * state.fatigue + seen @ params.item_genres[a]
    fatigue = jnp.where(jnp.any(valid), fatigue, state.fatigue)
    consumed = state.consumed.at[a].max(shown)
    length = params.history_len

    def push(h, v):  # the slate's shown items, top first, enter the history
        return jnp.concatenate([h, v.astype(h.dtype)])[-length:]

    unrewarded, t, terminated, truncated = _leave(k_leave, state, click, params)
    new_state = EnvState(
        t=t,
        hist_items=push(state.hist_items, jnp.where(valid, a, n_items)),
        hist_responses=push(state.hist_responses, clicks_at),
        hist_mask=push(state.hist_mask, shown),
        consumed=consumed,
        fatigue=fatigue,
        unrewarded=unrewarded,
        done=terminated | truncated,
    )
    info = {
        "click": clickf,
        "click_prob": slate_value(p, jnp.ones((k,)), jnp.zeros((k,)), decay),
        "expected_reward": expected,
        "best_expected_reward": best_er,
        "invalid": ~jnp.all(valid),
        "repeat": jnp.any(repeat),
        "clicks_at": clicks_at,
        "examined": seen,
        "ndcg": ndcg,
    }
    return _finish(state, new_state, reward, terminated, truncated, info, params)


def describe(params: EnvParams) -> dict[str, Any]:
    """Host-side summary of (batched) params for logging."""
    return {
        "n_items": int(params.n_items),
        "n_genres": int(params.n_genres),
        "horizon": params.horizon,
        "history_len": params.history_len,
        "batch_shape": tuple(params.affinity.shape[:-1]),
    }
