"""Policy-gradient estimators against closed forms: REINFORCE on a two-armed bandit, the DiCE
Hessian on a two-step no-repeat bandit, and the MAML-RL meta-gradient against the exact
expected-update objective."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarec.rl import maml, networks, pg
from metarec.rl.rollout import rollouts
from tests.conftest import bandit_env

P_CLICK = np.array([0.3, 0.8, 0.55])


def _sample(net, params, env, n, seed):
    return rollouts(jax.random.PRNGKey(seed), env, networks.sample_actor(net.apply, params), n)


def test_discounted_returns_and_gae_by_hand():
    r = jnp.array([[1.0, 0.0, 2.0, 5.0]])
    alive = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(pg.discounted_returns(r, alive, 0.5), [[1.5, 1.0, 2.0, 0.0]])
    v = jnp.array([[0.5, 1.0, 1.0, 9.0]])
    adv, target = pg.gae(r, v, alive, 0.5, 1.0)
    np.testing.assert_allclose(adv, [[1.0, 0.0, 1.0, 0.0]], atol=1e-6)  # = G - V on alive steps
    np.testing.assert_allclose(target, [[1.5, 1.0, 2.0, 0.0]], atol=1e-6)
    adv0, _ = pg.gae(r, v, alive, 0.5, 0.0)  # one-step TD errors
    np.testing.assert_allclose(
        adv0, [[1.0 + 0.5 - 0.5, 0.0 + 0.5 - 1.0, 2.0 - 1.0, 0.0]], atol=1e-6
    )


def test_reinforce_matches_exact_policy_gradient_two_armed_bandit():
    theta = jnp.array([0.2, -0.1])
    net = networks.make_tabular(2)
    env = bandit_env(P_CLICK[:2], 1)
    traj = _sample(net, {"logits": theta}, env, 100_000, 0)
    exact = jax.grad(lambda t: jnp.sum(jax.nn.softmax(t) * P_CLICK[:2]))(theta)
    for baseline in ("loo", "none", "mean"):
        g_hat = -jax.grad(pg.reinforce_loss)({"logits": theta}, net.apply, traj, 1.0, baseline)[
            "logits"
        ]
        np.testing.assert_allclose(g_hat, exact, atol=6e-3, err_msg=baseline)
    assert np.abs(exact).max() > 0.05  # the check is not vacuous


@pytest.mark.slow  # over 5 s per call in the default suite; CI runs `make test-slow` too
def test_dice_gradient_equals_reinforce_gradient():
    net = networks.make_tabular(3)
    params = {"logits": jnp.array([0.1, 0.3, -0.2])}
    traj = _sample(net, params, bandit_env(P_CLICK[:3], 2), 64, 1)
    g1 = jax.grad(pg.reinforce_loss)(params, net.apply, traj, 0.9, "loo")
    g2 = jax.grad(pg.dice_loss)(params, net.apply, traj, 0.9, "loo")
    np.testing.assert_allclose(g1["logits"], g2["logits"], rtol=1e-5, atol=1e-6)
    # and its value is the sampled discounted return
    disc = 0.9 ** jnp.arange(2)
    np.testing.assert_allclose(
        pg.dice_objective(params, net.apply, traj, 0.9, "loo"),
        jnp.mean(jnp.sum(traj.reward * traj.alive * disc, -1)),
        rtol=1e-5,
    )


def _exact_two_step_return(theta):
    """J(theta) for 2 steps without repeats over 3 items (tabular softmax, masked on step 2)."""
    p = jnp.asarray(P_CLICK)
    pi1 = jax.nn.softmax(theta)
    total = jnp.sum(pi1 * p)
    for a in range(3):
        logits2 = jnp.where(jnp.arange(3) == a, -1e9, theta)
        total = total + pi1[a] * jnp.sum(jax.nn.softmax(logits2) * p)
    return total


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_dice_hessian_is_unbiased_and_naive_hessian_is_not():
    net = networks.make_tabular(3)
    theta = jnp.array([0.4, -0.3, 0.1])
    traj = _sample(net, {"logits": theta}, bandit_env(P_CLICK[:3], 2), 200_000, 2)
    exact = jax.hessian(_exact_two_step_return)(theta)

    def dice(t):
        return pg.dice_objective({"logits": t}, net.apply, traj, 1.0, "none")

    def naive(t):  # sum_t log pi_t * G_t : right gradient, wrong Hessian
        return -pg.reinforce_loss({"logits": t}, net.apply, traj, 1.0, "none")

    np.testing.assert_allclose(
        jax.grad(dice)(theta), jax.grad(_exact_two_step_return)(theta), atol=6e-3
    )
    h_dice = jax.hessian(dice)(theta)
    np.testing.assert_allclose(h_dice, exact, atol=2e-2)
    assert np.abs(jax.hessian(naive)(theta) - exact).max() > 0.05


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_maml_meta_gradient_matches_exact_expected_update_objective():
    net = networks.make_tabular(2)
    alpha = 6.0
    env = bandit_env(P_CLICK[:2], 1)
    p = P_CLICK[:2]

    def J(t):
        return jnp.sum(jax.nn.softmax(t) * p)

    exact = jax.grad(lambda t: J(t + alpha * jax.grad(J)(t)))
    theta = jnp.array([1.0, 0.0])

    def meta_grad(first_order):
        cfg = maml.MetaRLConfig(
            inner_steps=1,
            inner_episodes=40_000,
            query_episodes=40_000,
            inner_lr=alpha,
            first_order=first_order,
            inner_baseline="loo",
            outer_baseline="loo",
            gamma=1.0,
        )
        learner = maml.make_meta_rl(net, cfg)
        mp = {"params": {"logits": theta}, "lr": {"logits": jnp.full(2, alpha)}}
        g = jax.grad(lambda m: learner.meta_loss(m, jax.random.PRNGKey(5), env)[0])(mp)
        assert np.abs(g["lr"]["logits"]).max() == 0  # plain MAML: learning rate not meta-learned
        return -g["params"]["logits"]

    ex = exact(theta)
    np.testing.assert_allclose(meta_grad(False), ex, atol=1.5e-2)
    fo = meta_grad(True)
    exact_fo = jax.grad(J)(theta + alpha * jax.grad(J)(theta))
    np.testing.assert_allclose(fo, exact_fo, atol=1.5e-2)
    assert np.abs(ex - exact_fo).max() > 0.045  # second-order term is big enough to be detected


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_meta_sgd_learning_rate_gets_gradient():
    net = networks.make_tabular(2)
    cfg = maml.MetaRLConfig(
        inner_steps=1,
        inner_episodes=256,
        query_episodes=256,
        inner_lr=1.0,
        meta_sgd=True,
        inner_baseline="loo",
        gamma=1.0,
    )
    learner = maml.make_meta_rl(net, cfg)
    mp = learner.init(jax.random.PRNGKey(0))
    g = jax.grad(
        lambda m: learner.meta_loss(m, jax.random.PRNGKey(1), bandit_env(P_CLICK[:2], 1))[0]
    )(mp)
    assert np.abs(g["lr"]["logits"]).max() > 0


def test_bad_baseline_rejected():
    with pytest.raises(ValueError, match="baseline"):
        maml.MetaRLConfig(inner_baseline="bogus").validate()
    with pytest.raises(ValueError, match="inner_episodes"):
        maml.MetaRLConfig(inner_baseline="loo", inner_episodes=1).validate()


def test_myopic_dice_gradient_credits_each_reward_to_its_own_action_only():
    net = networks.make_tabular(3)
    params = {"logits": jnp.array([0.1, 0.3, -0.2])}
    traj = _sample(net, params, bandit_env(P_CLICK[:3], 3), 8, 2)
    disc = 0.9 ** jnp.arange(3)
    for baseline in ("episode", "loo", "none"):
        g = jax.grad(pg.dice_loss)(params, net.apply, traj, 0.9, baseline, "myopic")["logits"]

        def by_hand(theta, baseline=baseline):  # sum_t log pi(a_t) (gamma^t r_t - b_t), b_t fixed
            logp, _, _ = networks.log_probs(net.apply, {"logits": theta}, traj.obs, traj.action)
            dr = disc * traj.reward * traj.alive
            if baseline == "episode":
                b = disc * jnp.mean(traj.reward, -1, keepdims=True)  # every step alive here
            elif baseline == "loo":
                b = (jnp.sum(dr, 0, keepdims=True) - dr) / (dr.shape[0] - 1)
            else:
                b = jnp.zeros_like(dr)
            return -jnp.mean(jnp.sum(logp * (dr - b) * traj.alive, -1))

        np.testing.assert_allclose(
            g, jax.grad(by_hand)(params["logits"]), rtol=1e-5, atol=1e-6, err_msg=baseline
        )
    # its value is still the sampled return
    np.testing.assert_allclose(
        pg.dice_objective(params, net.apply, traj, 0.9, "episode", "myopic"),
        jnp.mean(jnp.sum(traj.reward * traj.alive * disc, -1)),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="credit"):
        pg.dice_loss(params, net.apply, traj, 0.9, "episode", "bogus")


@pytest.mark.slow  # over 12 s in the default suite; CI runs `make test-slow` too
def test_value_baseline_uses_the_critic_in_reinforce_and_dice():
    net = networks.make_item_scorer(3, 1, 4, 8)
    params = net.init(jax.random.PRNGKey(0))
    traj = _sample(net, params, bandit_env(P_CLICK[:3], 3), 16, 3)
    g1 = jax.grad(pg.reinforce_loss)(params, net.apply, traj, 0.9, "value")
    g2 = jax.grad(pg.dice_loss)(params, net.apply, traj, 0.9, "value")
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert (
        np.abs(np.asarray(g1["value"]["kernel"])).max() == 0
    )  # the critic is only a (stop-gradient) baseline


def test_inner_params_freeze_the_rest_and_meta_sgd_rates_are_clipped_at_zero():
    net = networks.make_item_scorer(3, 1, 4, 8)
    traj = _sample(net, net.init(jax.random.PRNGKey(0)), bandit_env(P_CLICK[:3], 3), 4, 4)
    cfg = maml.MetaRLConfig(
        inner_params=("item_bias", "user/bias"), meta_sgd=True, inner_episodes=4
    )
    learner = maml.make_meta_rl(net, cfg)
    mp = learner.init(jax.random.PRNGKey(0))
    assert (
        float(mp["lr"]["user"]["kernel"].max()) == 0
        and float(mp["lr"]["item_bias"].min()) == cfg.inner_lr
    )
    new = learner.inner_step(mp, mp["params"], traj)
    changed = jax.tree_util.tree_map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), new, mp["params"]
    )
    assert changed["item_bias"] and changed["user"]["bias"]
    frozen = [changed[k] for k in ("hidden", "item_in", "item_out", "value")] + [
        changed["user"]["kernel"]
    ]
    assert not any(jax.tree_util.tree_leaves(frozen))
    # a learned negative rate (or one on a frozen parameter) does not step
    neg = {**mp, "lr": jax.tree_util.tree_map(lambda a: -jnp.ones_like(a), mp["lr"])}
    same = learner.inner_step(neg, mp["params"], traj)
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(mp["params"])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="no parameters"):
        maml.make_meta_rl(net, maml.MetaRLConfig(inner_params=("usr",))).init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="inner_credit"):
        maml.MetaRLConfig(inner_credit="bogus").validate()
