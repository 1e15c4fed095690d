"""The numpy reference simulator of the throughput benchmark is the JAX simulator: fed the uniforms
the JAX step draws, it gives the same rewards, ends, fatigue, shown items and oracle reward; and
a tiny benchmark run writes every documented key. No timing is asserted."""

import json

import jax
import numpy as np
import pytest

from benchmarks.rl_env import bench
from benchmarks.rl_env.numpy_env import run_random_episodes, users_of
from metarec.rl import env as E


def test_numpy_simulator_steps_like_the_jax_simulator():
    cfg = E.EnvConfig(horizon=12, leave_growth=0.15, repeat_penalty=0.3)
    envs = bench.make_users(3, 9, cfg.horizon, seed=4)
    envs = E.make_env_params(np.asarray(envs.affinity), np.asarray(envs.item_genres[0]), cfg)
    rng = np.random.default_rng(0)
    for u, user in enumerate(users_of(envs)):
        e = E.index_params(envs, u)
        _, state = E.reset(jax.random.PRNGKey(0), e)
        key = jax.random.PRNGKey(u)
        for _ in range(cfg.horizon):
            key, k = jax.random.split(key)
            action = int(rng.integers(-1, 10))  # includes invalid ids and repeats
            k_click, k_leave = jax.random.split(k)
            u_click = float(jax.random.uniform(k_click))
            u_leave = float(jax.random.uniform(k_leave))
            was_done = bool(state.done)
            _, state, reward, term, trunc, info = E.step(k, state, action, e)
            r, done = user.step(action, u_click, u_leave)
            assert np.isclose(r, float(reward), atol=1e-6)
            assert done == bool(state.done)
            np.testing.assert_allclose(user.fatigue, state.fatigue, atol=1e-6)
            np.testing.assert_array_equal(user.consumed, state.consumed)
            if not was_done:
                assert np.isclose(
                    user.best_expected_reward, float(info["best_expected_reward"]), atol=1e-5
                )
    assert 3 <= run_random_episodes(users_of(envs), seed=1) <= 3 * cfg.horizon


@pytest.mark.slow  # over 6 s in the default suite (2026-12-07); CI runs `make test-slow` too
def test_benchmark_writes_its_json(tmp_path):
    out = bench.run(
        str(tmp_path),
        "test",
        users=(1, 4),
        numpy_users=2,
        items=6,
        horizon=3,
        min_time=0.0,
        log_fn=lambda *a: None,
    )
    assert json.loads((tmp_path / "rl_env.json").read_text()) == json.loads(json.dumps(out))
    assert {"command", "machine", "numpy", "rows", "items", "horizon"} <= set(out)
    assert [r["users"] for r in out["rows"]] == [1, 4]
    for r in out["rows"]:
        assert r["env"]["steps"] >= r["users"] and r["env_vs_numpy"] > 0
        assert r["metabandit_rollout"]["steps_per_s"] > 0
