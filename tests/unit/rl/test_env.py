"""Environment semantics: determinism, vmap == loop, jit == no-jit, termination, ranges, invalid
actions, and the oracle's choices against the click model written out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarec.rl import env as E
from metarec.rl import rollout as R

N_ITEMS, N_GENRES = 6, 3


SMALL = E.EnvConfig(horizon=5, history_len=3)


def _params(config=SMALL, n_users=None, seed=0, **kw):
    rng = np.random.default_rng(seed)
    shape = (N_ITEMS,) if n_users is None else (n_users, N_ITEMS)
    aff = rng.uniform(1, 5, size=shape)
    genres = np.eye(N_GENRES)[np.arange(N_ITEMS) % N_GENRES]
    return E.make_env_params(aff, genres, config, **kw)


def _uniform_actor(key, state, obs):
    logits = jnp.where(obs["action_mask"] > 0, 0.0, -1e9)
    return jax.random.categorical(key, logits).astype(jnp.int32), {}


def test_determinism_for_a_key():
    p = _params()
    t1, _ = R.rollout(jax.random.PRNGKey(3), p, _uniform_actor)
    t2, _ = R.rollout(jax.random.PRNGKey(3), p, _uniform_actor)
    t3, _ = R.rollout(jax.random.PRNGKey(4), p, _uniform_actor)
    for a, b in zip(jax.tree_util.tree_leaves(t1), jax.tree_util.tree_leaves(t2)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(t1.action, t3.action) or not np.array_equal(t1.reward, t3.reward)


def test_vmap_over_users_equals_loop_and_jit_equals_nojit():
    p = _params(n_users=4)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)

    def f(k, e):
        return R.rollout(k, e, _uniform_actor)[0]

    batched = jax.jit(jax.vmap(f))(keys, p)
    for u in range(4):
        single = f(keys[u], E.index_params(p, u))
        for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(batched)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b)[u], rtol=1e-6, atol=1e-6)


def test_step_jit_equals_nojit():
    p = _params()
    obs, s = E.reset(jax.random.PRNGKey(0), p)
    out1 = E.step(jax.random.PRNGKey(1), s, 2, p)
    out2 = jax.jit(E.step)(jax.random.PRNGKey(1), s, 2, p)
    for a, b in zip(jax.tree_util.tree_leaves(out1), jax.tree_util.tree_leaves(out2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_truncated_at_horizon_without_leaving():
    cfg = E.EnvConfig(horizon=4, history_len=2, leave_base=0.0, leave_growth=0.0)
    traj, _ = R.rollout(jax.random.PRNGKey(0), _params(cfg), _uniform_actor)
    np.testing.assert_array_equal(traj.alive, [1, 1, 1, 1])
    np.testing.assert_array_equal(traj.truncated, [0, 0, 0, 1])
    assert not traj.terminated.any()


def test_terminated_when_user_leaves_then_noop():
    cfg = E.EnvConfig(horizon=5, history_len=2, leave_base=1.0)
    p = _params(cfg)
    traj, _ = R.rollout(jax.random.PRNGKey(0), p, _uniform_actor)
    np.testing.assert_array_equal(traj.alive, [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(traj.terminated, [1, 0, 0, 0, 0])
    assert not traj.truncated.any()
    assert float(jnp.sum(jnp.abs(traj.reward[1:]))) == 0.0
    # leave probability grows with unrewarded steps: all-zero click probs, growth 0.5 -> leaves
    # by step 2
    cfg2 = E.EnvConfig(horizon=6, history_len=2, leave_growth=0.5, threshold=100.0)
    traj2, _ = R.rollout(jax.random.PRNGKey(1), _params(cfg2), _uniform_actor)
    assert traj2.terminated[:2].any() and traj2.alive.sum() <= 2
    assert not (traj2.terminated & traj2.truncated).any()


def test_rewards_and_probabilities_in_range():
    p = _params(E.EnvConfig(horizon=6, history_len=3, leave_growth=0.0), n_users=8)
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    traj = jax.vmap(lambda k, e: R.rollout(k, e, _uniform_actor)[0])(keys, p)
    pr = np.asarray(traj.info["click_prob"])
    assert (pr >= 0).all() and (pr <= 1).all()
    r = np.asarray(traj.reward)
    assert set(np.unique(r)).issubset({0.0, 1.0})
    np.testing.assert_array_equal(r, np.asarray(traj.info["click"]))
    # no repeats under the action mask
    for u in range(8):
        a = np.asarray(traj.action[u])
        assert len(set(a.tolist())) == len(a)
    _, s = E.reset(jax.random.PRNGKey(0), E.index_params(p, 0))
    cp = np.asarray(E.click_probs(s, E.index_params(p, 0)))
    assert (cp > 0).all() and (cp < 1).all()


def test_boredom_lowers_click_prob_of_same_genre():
    cfg = E.EnvConfig(horizon=5, history_len=2, boredom_weight=2.0, leave_growth=0.0)
    p = _params(cfg)
    _, s = E.reset(jax.random.PRNGKey(0), p)
    before = E.click_probs(s, p)
    _, s2, *_ = E.step(jax.random.PRNGKey(1), s, 0, p)  # item 0 has genre 0, as does item 3
    after = E.click_probs(s2, p)
    assert after[3] < before[3] and np.isclose(after[1], before[1])


def test_invalid_actions_are_penalised_not_crashing():
    cfg = E.EnvConfig(
        horizon=5,
        history_len=2,
        invalid_penalty=0.7,
        repeat_penalty=0.2,
        threshold=-100.0,
        leave_growth=0.0,
    )
    mask = np.ones(N_ITEMS)
    mask[1] = 0
    p = _params(cfg, item_mask=mask)
    _, s = E.reset(jax.random.PRNGKey(0), p)
    for bad in (-1, N_ITEMS, 1):
        obs, s2, r, term, trunc, info = E.step(jax.random.PRNGKey(1), s, bad, p)
        assert (
            float(r) == pytest.approx(-0.7) and bool(info["invalid"]) and float(info["click"]) == 0
        )
        assert int(s2.t) == 1 and int(s2.unrewarded) == 1 and float(s2.hist_mask.sum()) == 0
    _, s2, r, *_, info = E.step(jax.random.PRNGKey(1), s, 2, p)
    assert float(r) == 1.0  # threshold -100: sure click
    _, s3, r, *_, info = E.step(jax.random.PRNGKey(2), s2, 2, p)
    assert bool(info["repeat"]) and float(r) == pytest.approx(-0.2) and float(info["click"]) == 0
    assert float(obs["action_mask"][1]) == 0


def test_oracle_takes_the_best_available_item_computed_by_hand():
    # 4 items, genres 0, 0, 1, 1: boredom makes the greedy order (0, 2, 1, 3) differ from the
    # affinity order (0, 1, 2, 3), and no item may be shown twice
    aff = np.array([4.0, 3.9, 3.6, 2.0])
    genres = np.eye(2)[[0, 0, 1, 1]]
    cfg = E.EnvConfig(
        horizon=4,
        history_len=2,
        threshold=3.5,
        temperature=0.5,
        boredom_weight=1.5,
        boredom_decay=0.5,
        leave_base=0.0,
        leave_growth=0.0,
    )
    traj = R.oracle_rollout(jax.random.PRNGKey(0), E.make_env_params(aff, genres, cfg))
    fatigue, shown, actions, best = np.zeros(2), [], [], []
    for _ in range(4):  # the env's click model, written out
        p = 1 / (1 + np.exp(-((aff - 3.5) / 0.5 - 1.5 * genres @ fatigue)))
        p[shown] = -np.inf
        a = int(np.argmax(p))
        actions.append(a), best.append(p[a]), shown.append(a)
        fatigue = 0.5 * fatigue + genres[a]
    assert actions == [0, 2, 1, 3]
    np.testing.assert_array_equal(traj.action, actions)
    np.testing.assert_allclose(traj.info["best_expected_reward"], best, rtol=1e-5)
    np.testing.assert_allclose(traj.info["expected_reward"], best, rtol=1e-5)


def test_oracle_beats_random_and_random_has_positive_regret():
    p = _params(E.EnvConfig(horizon=5, history_len=3), n_users=16)
    keys = jax.random.split(jax.random.PRNGKey(0), 16)
    o = R.episode_metrics(jax.vmap(R.oracle_rollout)(keys, p))
    rnd = R.episode_metrics(jax.vmap(lambda k, e: R.rollout(k, e, _uniform_actor)[0])(keys, p))
    assert float(o["ctr"].mean()) > float(rnd["ctr"].mean())
    assert (np.asarray(rnd["regret"]) >= -1e-6).all() and float(rnd["regret"].mean()) > 0


@pytest.mark.parametrize(
    "field,value",
    [("temperature", 0.0), ("horizon", 0), ("boredom_decay", 1.5), ("leave_base", -0.1)],
)
def test_params_validated_when_env_is_made(field, value):
    cfg = E.EnvConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        _params(cfg)


def test_bad_shapes_rejected():
    with pytest.raises(ValueError, match="item_genres"):
        E.make_env_params(np.ones(4), np.ones((3, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        E.make_env_params(np.array([1.0, np.nan]), np.ones((2, 1)))
    with pytest.raises(ValueError, match="item_mask"):
        E.make_env_params(np.ones(2), np.ones((2, 1)), item_mask=np.zeros(2))
