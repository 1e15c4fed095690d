"""REINFORCE, PPO and DQN improve on a small synthetic environment; training is seeded and vmaps
over seeds."""

import jax
import numpy as np
import pytest

from metarec.rl import dqn, networks, ppo, reinforce
from metarec.rl import env as E
from metarec.rl import evaluate as EV
from metarec.rl import simulator as S

CFG = E.EnvConfig(horizon=5, history_len=3, leave_growth=0.0, boredom_weight=0.0)


@pytest.fixture(scope="module")
def setup():
    sim = S.synthetic_simulator(
        0, 32, 16, 12, env_config=CFG, mf_steps=20, planted_best=2, n_clusters=2
    )
    net = networks.make_item_scorer(12, 3, embed_dim=8, hidden=16)
    return sim, net


def _untrained_return(setup):
    sim, net = setup
    p = net.init(jax.random.PRNGKey(0))
    m = EV.evaluate_users(jax.random.PRNGKey(9), EV.fixed_policy_agent(net, p), sim.test, 0, 8)
    return float(np.mean(m["return"]))


@pytest.mark.slow  # ~30-40 s per algorithm on an idle 2-core CPU (compile-dominated)
@pytest.mark.parametrize("algo", ["ppo", "dqn", "reinforce"])
def test_agent_improves_on_held_out_users(setup, algo):
    sim, net = setup
    if algo == "ppo":
        train = ppo.make_train(ppo.PPOConfig(num_updates=40, num_envs=16, lr=1e-2), net)
    elif algo == "dqn":
        train = dqn.make_train(
            dqn.DQNConfig(
                num_iterations=40,
                num_envs=8,
                buffer_size=1024,
                batch_size=64,
                updates_per_iter=2,
                target_every=4,
                lr=5e-3,
            ),
            net,
        )
    else:
        train = reinforce.make_train(
            reinforce.ReinforceConfig(num_updates=40, num_envs=16, lr=5e-2), net
        )
    out = jax.jit(train)(jax.random.PRNGKey(1), sim.train)
    r = np.asarray(out["metrics"]["return"])
    assert r.shape == (40,)
    assert r[-8:].mean() > r[:8].mean() + 0.3, r
    agent = EV.fixed_policy_agent(net, out["params"], greedy=(algo == "dqn"))
    m = EV.evaluate_users(jax.random.PRNGKey(9), agent, sim.test, 0, 8)
    assert float(np.mean(m["return"])) > _untrained_return(setup) + 0.3


def test_training_is_seeded_and_vmaps_over_seeds(setup):
    sim, _ = setup
    net = networks.make_tabular(12)
    train = reinforce.make_train(reinforce.ReinforceConfig(num_updates=3, num_envs=4), net)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    batched = jax.jit(jax.vmap(train, in_axes=(0, None)))(keys, sim.train)
    single = jax.jit(train)(keys[1], sim.train)
    np.testing.assert_allclose(
        batched["metrics"]["return"][1], single["metrics"]["return"], rtol=1e-5
    )
    again = jax.jit(train)(keys[1], sim.train)
    for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_config_validation():
    with pytest.raises(ValueError, match="clip_eps"):
        ppo.PPOConfig(clip_eps=1.5).validate()
    with pytest.raises(ValueError, match="batch_size"):
        dqn.DQNConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="baseline"):
        reinforce.ReinforceConfig(baseline="x").validate()
