"""The RL² policy: its REINFORCE estimator is the gradient of the expected clicks, also through the
GRU state (checked against the closed form on a two-step bandit), evaluation vmapped over users
equals one user at a time, a slate updates as its examined positions one by one, and meta-training
is seeded and equal in pieces."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarec.rl import bandits, loop
from metarec.rl import env as E
from metarec.rl import evaluate as EV
from metarec.rl import rl2 as R
from metarec.rl import simulator as S
from metarec.training.checkpoint import tree_digest


def _items(n_items, k=2, seed=0):
    rng = np.random.default_rng(seed)
    return bandits.item_inputs(
        rng.normal(size=(n_items, k)), rng.normal(size=n_items), rng.integers(1, 50, n_items)
    )


def _params(n_items, cfg, seed=0):
    """Initial parameters with a random read-out, so the clicks reach the policy through the GRU."""
    p = R.initial_params(_items(n_items, seed=seed), cfg, jax.random.PRNGKey(seed))
    read = jax.random.normal(jax.random.PRNGKey(seed + 1), p["read"].shape)
    return {**p, "read": read, "h0": 0.3 * jnp.ones_like(p["h0"])}


@pytest.mark.slow  # over 5 s per call in the default suite; CI runs `make test-slow` too
def test_reinforce_estimate_matches_the_exact_gradient_through_the_memory():
    # two steps, no satiation, no leaving, no repeats: E[clicks] = sum_a1 pi(a1) [p(a1) +
    # sum_c P(c | a1) sum_a2 pi(a2 | GRU(h0, a1, c), a2 != a1) p(a2)]
    n_items = 3
    cfg = R.RL2Config(hidden=4, trial_episodes=1, trials=8, temperature=0.5, gamma=1.0)
    params = _params(n_items, cfg)
    genres = jnp.zeros((n_items, 1))
    aff = np.array([2.5, 3.5, 4.5])
    env = E.make_env_params(aff, np.zeros((n_items, 1)), E.EnvConfig(horizon=2, leave_growth=0.0))
    p = jax.nn.sigmoid((jnp.asarray(aff) - 3.5) / 0.5)
    ones = jnp.ones(n_items)

    def expected(prm):
        pi1 = jax.nn.softmax(R.logits(prm, {"h": prm["h0"]}, {"action_mask": ones}))
        total = jnp.sum(pi1 * p)
        for a1 in range(n_items):
            for c in (0.0, 1.0):
                info = {"click": jnp.asarray(c), "invalid": jnp.asarray(False)}
                h = R.update(prm, {"h": prm["h0"]}, jnp.asarray(a1), info)
                mask = ones.at[a1].set(0.0)
                pi2 = jax.nn.softmax(R.logits(prm, h, {"action_mask": mask}))
                total += pi1[a1] * (p[a1] if c else 1 - p[a1]) * jnp.sum(pi2 * p * mask)
        return total

    exact = jax.grad(expected)(params)
    n = 4000
    one = jax.jit(
        jax.vmap(lambda k: jax.grad(lambda q: R.trial_loss(q, k, genres, env, cfg)[0])(params))
    )
    # 4 x 1000 draws: XLA:CPU 0.10.2 can hang on a rollout vmapped over ~4096 (BUILD_NOTES)
    keys = jax.random.split(jax.random.PRNGKey(0), n).reshape(4, n // 4, -1)
    parts = [one(k) for k in keys]
    grads = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts)
    for name in ("prior", "read", "w_x"):  # w_x acts only through the state
        g = np.asarray(grads[name]).reshape(n, -1)
        # the loss averages over the trial's 2 steps: minus the clicks' gradient / 2
        est, se = -2 * g.mean(0), 2 * g.std(0) / np.sqrt(n)
        ex = np.asarray(exact[name]).reshape(-1)
        assert np.all(np.abs(est - ex) < 4 * se + 1e-4), (name, est, ex, se)
        assert np.abs(ex).max() > 8 * se.max(), name  # the check has power


@pytest.mark.slow  # over 6 s in the default suite (2026-12-07); CI runs `make test-slow` too
def test_vmapped_evaluation_equals_one_user_at_a_time_and_slates_update_position_by_position():
    n_items, cfg = 8, R.RL2Config(hidden=4)
    params = _params(n_items, cfg)
    rng = np.random.default_rng(0)
    genres = np.eye(2, dtype=np.float32)[np.arange(n_items) % 2]
    envs = E.make_env_params(rng.normal(3.5, 1, (3, n_items)), genres, E.EnvConfig(horizon=3))
    agent = EV.in_context_agent(R.make_agent_fns, params, jnp.asarray(genres))
    key = jax.random.PRNGKey(2)
    out = jax.jit(lambda k, e: EV.evaluate_users(k, agent, e, 2, 2))(key, envs)
    assert out["ctr"].shape == (3, 3)
    keys = jax.random.split(key, 3)
    for u in range(3):
        one = EV.adaptation_curve(keys[u], agent, E.index_params(envs, u), 2, 2)
        np.testing.assert_allclose(one["ctr"], out["ctr"][u], rtol=1e-5, atol=1e-6)
    # a slate [3, 5, 1] where the user examined the first two and clicked the second
    info = {"clicks_at": jnp.asarray([0.0, 1.0, 0.0]), "examined": jnp.asarray([1.0, 1.0, 0.0])}
    slate = R.update(params, {"h": params["h0"]}, jnp.asarray([3, 5, 1]), info)
    h = {"h": params["h0"]}
    for a, c in ((3, 0.0), (5, 1.0)):
        h = R.update(
            params, h, jnp.asarray(a), {"click": jnp.asarray(c), "invalid": jnp.asarray(False)}
        )
    np.testing.assert_allclose(slate["h"], h["h"], rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # ~15 s (compiles three training programs); the loop is the meta-bandit's
def test_training_in_pieces_equals_one_piece_and_is_seeded():
    sim = S.synthetic_simulator(0, 16, 4, 10, env_config=E.EnvConfig(horizon=4), mf_steps=10)
    items = bandits.item_inputs(sim.agent_item_factors, sim.agent_item_score, sim.popularity)
    cfg = R.RL2Config(hidden=4, num_iterations=4, meta_batch=2, trials=2, trial_episodes=2)
    t = R.make_trainer(cfg)
    run = jax.jit(t.run, static_argnames="length")

    def fresh():
        return t.init(jax.random.PRNGKey(1), sim.train, R.initial_params(items, cfg))

    one, m_one = run(fresh(), sim.train, 0, 4)
    assert m_one["ctr"].shape == (4,) and np.all(np.isfinite(m_one["loss"]))
    out = loop.train_checkpointed(run, fresh, sim.train, 4, every=2)
    assert tree_digest(out.state) == tree_digest(one)
    assert tree_digest(run(fresh(), sim.train, 0, 4)[0]) == tree_digest(one)
    assert not np.allclose(one["params"]["read"], 0.0)  # it trained, from the prior's policy


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="RL2Config.hidden"):
        dataclasses.replace(R.RL2Config(), hidden=0).validate()
    with pytest.raises(ValueError, match="RL2Config.trials"):
        R.make_trainer(R.RL2Config(trials=1))
