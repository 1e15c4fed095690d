"""Slates: the cascade click model against its closed form and Monte Carlo, no repeats, the oracle
slate against brute force, slate nDCG by hand, Plackett-Luce log-probabilities against sampling,
and the slate updates of the bandits and the meta-learned bandit against one-item updates."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarec.rl import bandits, networks
from metarec.rl import env as E
from metarec.rl import evaluate as ev
from metarec.rl import meta_bandit as mb

N_ITEMS, K, DECAY = 7, 3, 0.7
CFG = E.EnvConfig(
    horizon=2, history_len=4, slate_size=K, examine_decay=DECAY, leave_growth=0.0, leave_base=0.0
)


def _params(config=CFG, seed=0):
    rng = np.random.default_rng(seed)
    aff = rng.uniform(2.5, 4.5, size=N_ITEMS)
    genres = np.eye(3)[np.arange(N_ITEMS) % 3]
    return E.make_env_params(aff, genres, config)


def _cascade(p, decay=DECAY):
    """P(click) of a ranked slate written out position by position."""
    total, reach = 0.0, 1.0
    for pj in p:
        total += reach * pj
        reach *= (1 - pj) * decay
    return total


def test_cascade_click_probability_closed_form_and_monte_carlo():
    params = _params()
    _, state = E.reset(None, params)
    slate = jnp.array([4, 0, 2])
    p = np.asarray(E.click_probs(state, params))[[4, 0, 2]]
    info = E.step(jax.random.PRNGKey(0), state, slate, params)[5]
    assert float(info["click_prob"]) == pytest.approx(_cascade(p), rel=1e-5)
    assert float(info["expected_reward"]) == pytest.approx(_cascade(p), rel=1e-5)
    n = 20_000
    infos = jax.jit(jax.vmap(lambda k: E.step(k, state, slate, params)[5]))(
        jax.random.split(jax.random.PRNGKey(1), n)
    )
    clicks = np.asarray(infos["click"])
    se = np.sqrt(_cascade(p) * (1 - _cascade(p)) / n)
    assert abs(clicks.mean() - _cascade(p)) < 4 * se
    # position j is reached w.p. decay^j prod_{l<j} (1 - p_l)
    reach = [1.0, DECAY * (1 - p[0]), DECAY**2 * (1 - p[0]) * (1 - p[1])]
    np.testing.assert_allclose(np.asarray(infos["examined"]).mean(0), reach, atol=0.015)
    # the cascade: at most one click, nothing examined below it, clicks only where examined
    at, ex = np.asarray(infos["clicks_at"]), np.asarray(infos["examined"])
    assert at.sum(1).max() == 1 and np.all(at <= ex)
    first = np.argmax(at, 1)
    below = np.arange(K)[None, :] > first[:, None]
    assert not np.any(ex[(at.sum(1) == 1)[:, None] & below])


def test_no_repeats_within_a_slate_and_across_steps():
    params = _params()
    _, state = E.reset(None, params)
    _, s2, _, _, _, info = E.step(jax.random.PRNGKey(0), state, jnp.array([1, 1, 3]), params)
    assert bool(info["repeat"])  # the second 1
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(s2.consumed)), [1, 3])
    p = np.asarray(E.click_probs(state, params))
    assert float(info["click_prob"]) == pytest.approx(_cascade([p[1], 0.0, p[3]]), rel=1e-5)
    # items shown before never click again, whatever the draw
    infos = jax.jit(jax.vmap(lambda k: E.step(k, s2, jnp.array([1, 3, 1]), params)[5]))(
        jax.random.split(jax.random.PRNGKey(2), 200)
    )
    assert float(np.asarray(infos["click"]).max()) == 0.0
    assert np.all(np.asarray(infos["click_prob"]) == 0.0)
    obs = E.get_obs(s2, params)
    assert obs["action_mask"][1] == 0 and obs["action_mask"][3] == 0
    # the history holds the slate's items, top first (a repeat too, as a one-item step's would)
    assert list(np.asarray(s2.hist_items)[-3:]) == [1, 1, 3]
    np.testing.assert_array_equal(np.asarray(s2.hist_mask), [0.0, 1.0, 1.0, 1.0])


def test_oracle_slate_is_the_best_ranked_list_by_brute_force():
    params = _params(seed=3)
    _, state = E.reset(None, params)
    p = np.asarray(E.click_probs(state, params))
    best = max(_cascade(p[list(s)]) for s in itertools.permutations(range(N_ITEMS), K))
    oracle = E.oracle_action(state, params)
    assert _cascade(p[np.asarray(oracle)]) == pytest.approx(best, rel=1e-6)
    info = E.step(jax.random.PRNGKey(0), state, oracle, params)[5]
    assert float(info["best_expected_reward"]) == pytest.approx(best, rel=1e-5)
    assert float(info["ndcg"]) == pytest.approx(1.0, rel=1e-6)


def test_slate_ndcg_by_hand():
    params = _params(seed=4)
    _, state = E.reset(None, params)
    p = np.asarray(E.click_probs(state, params))
    slate = np.argsort(p)[:K]  # the worst three, worst first
    disc = 1 / np.log2(np.arange(K) + 2)
    expect = (p[slate] * disc).sum() / (np.sort(p)[::-1][:K] * disc).sum()
    info = E.step(jax.random.PRNGKey(0), state, jnp.asarray(slate), params)[5]
    assert float(info["ndcg"]) == pytest.approx(expect, rel=1e-5)


def test_slate_settings_are_checked():
    with pytest.raises(ValueError, match="EnvConfig.examine_decay=0.0 is invalid"):
        E.EnvConfig(slate_size=2, examine_decay=0.0).validate()
    with pytest.raises(ValueError, match="EnvConfig.slate_size=0 is invalid"):
        E.EnvConfig(slate_size=0).validate()
    params = _params()
    _, state = E.reset(None, params)
    with pytest.raises(ValueError, match=r"slate action must have shape \(3,\)"):
        E.step(jax.random.PRNGKey(0), state, jnp.array([0, 1]), params)


# ------------------------------------------------------------------ Plackett-Luce
def test_plackett_luce_probabilities_sum_to_one_and_match_gumbel_sampling():
    logits = jnp.array([0.3, -1.0, 1.2, 0.0, networks.NEG])  # the last item is masked
    perms = list(itertools.permutations(range(5), 2))
    probs = np.array([float(jnp.exp(networks.slate_log_prob(logits, jnp.array(s)))) for s in perms])
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)
    # the first position is the softmax; the second the softmax over the rest
    sm = np.asarray(jax.nn.softmax(logits))
    i = perms.index((2, 0))
    assert probs[i] == pytest.approx(sm[2] * sm[0] / (1 - sm[2]), rel=1e-5)
    n = 40_000
    slates, logp = jax.vmap(lambda k: networks.sample_slate(k, logits, 2))(
        jax.random.split(jax.random.PRNGKey(0), n)
    )
    slates = np.asarray(slates)
    assert not np.any(slates == 4) and np.all(slates[:, 0] != slates[:, 1])
    freq = np.array([np.mean((slates[:, 0] == a) & (slates[:, 1] == b)) for a, b in perms])
    np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(probs.max() / n))
    # the sampler's log-probability is that of the slate it drew
    drawn = np.log([probs[perms.index(tuple(s))] for s in slates[:50]])
    np.testing.assert_allclose(np.asarray(logp)[:50], drawn, rtol=1e-5)


def test_log_probs_of_slate_actions_are_plackett_luce():
    net = networks.make_tabular(6, jnp.arange(6, dtype=jnp.float32) * 0.3)
    params = net.init(jax.random.PRNGKey(0))
    obs = {"step": jnp.zeros((2,)), "action_mask": jnp.ones((2, 6)).at[1, 5].set(0.0)}
    actions = jnp.array([[5, 0, 2], [4, 3, 1]])
    logp, _, _ = networks.log_probs(net.apply, params, obs, actions)
    logits = networks.masked_logits(jnp.arange(6) * 0.3, obs["action_mask"])
    expect = jax.vmap(networks.slate_log_prob)(logits, actions)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(expect), rtol=1e-6)
    # a single-item action keeps the softmax log-probability
    single, _, _ = networks.log_probs(net.apply, params, obs, actions[:, 0])
    np.testing.assert_allclose(
        np.asarray(single), np.asarray(jax.nn.log_softmax(logits)[jnp.arange(2), actions[:, 0]])
    )


# ------------------------------------------------------------------ slate-aware agents
def _items(seed=0):
    rng = np.random.default_rng(seed)
    return bandits.item_inputs(rng.normal(size=(N_ITEMS, 2)), rng.normal(size=N_ITEMS), np.ones(7))


def test_bandit_slate_update_is_one_item_updates_on_the_examined_positions():
    items = _items()
    hp = {k: v[0] for k, v in bandits.hyper_params(["linucb"]).items()}
    state = bandits.init(items, hp)
    slate = jnp.array([2, 5, 0])
    info = {"examined": jnp.array([1.0, 1.0, 0.0]), "clicks_at": jnp.array([0.0, 1.0, 0.0])}
    out = bandits.update(state, None, slate, None, info)
    ref = state
    for a, c in ((2, 0.0), (5, 1.0)):  # position 3 was not examined
        one = {"invalid": jnp.array(False), "click": jnp.array(c)}
        ref = bandits.update(ref, None, jnp.array(a), None, one)
    np.testing.assert_allclose(np.asarray(out["A"]), np.asarray(ref["A"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["b"]), np.asarray(ref["b"]), rtol=1e-6)
    # the greedy slate is the best-scored valid items in order
    obs = {"action_mask": jnp.ones(N_ITEMS).at[3].set(0.0)}
    greedy, _ = bandits.slate_act(K)(
        jax.random.PRNGKey(0), {**state, "hp": {**hp, "alpha": 0.0}}, obs
    )
    scores = np.asarray(items["mf"]).copy()
    scores[3] = -np.inf
    np.testing.assert_array_equal(np.asarray(greedy), np.argsort(-scores)[:K])


def test_meta_bandit_slate_update_uses_only_examined_positions():
    items = _items(1)
    params = mb.initial_params(items, mb.MetaBanditConfig(item_weight=1.0, fatigue_weight=0.5))
    genres = jnp.asarray(np.eye(3)[np.arange(N_ITEMS) % 3], jnp.float32)
    state = mb.init_state(params, 3)
    obs = {"step": jnp.array(0.5)}
    slate = jnp.array([1, 4, 6])
    info = {"examined": jnp.array([1.0, 0.0, 0.0]), "clicks_at": jnp.array([1.0, 0.0, 0.0])}
    out = mb.update(params, genres, state, obs, slate, info)
    one = {"invalid": jnp.array(False), "click": jnp.array(1.0)}
    ref = mb.update(params, genres, state, obs, jnp.array(1), one)
    for name in out:
        np.testing.assert_allclose(np.asarray(out[name]), np.asarray(ref[name]), rtol=1e-6)


@pytest.mark.slow  # over 5 s per call in the default suite; CI runs `make test-slow` too
def test_slate_agents_run_on_batched_users_with_ndcg():
    config = E.EnvConfig(horizon=2, history_len=4, slate_size=K, examine_decay=DECAY)
    rng = np.random.default_rng(0)
    params = E.make_env_params(rng.uniform(2, 5, (3, N_ITEMS)), np.eye(3)[np.arange(7) % 3], config)
    items = _items()
    meta = mb.initial_params(items, mb.MetaBanditConfig())
    key = jax.random.PRNGKey(0)

    @jax.jit
    def run(params):
        agent = ev.meta_bandit_agent(meta, params.item_genres[0], K)
        return (
            ev.evaluate_bandits(key, ["linucb"], items, params, 1, 2)["linucb"],
            ev.evaluate_users(key, agent, params, 1, 2),
            ev.oracle_metrics(key, params, 2),
        )

    linucb, mbo, oracle = run(params)
    for m in (linucb, mbo):
        assert set(m) == {"ctr", "return", "regret", "ndcg"} and m["ndcg"].shape == (3, 2)
        assert np.all((np.asarray(m["ndcg"]) >= 0) & (np.asarray(m["ndcg"]) <= 1 + 1e-6))
    np.testing.assert_allclose(np.asarray(oracle["ndcg"]), 1.0, rtol=1e-6)
    assert np.all(np.asarray(oracle["regret"]) == 0)
