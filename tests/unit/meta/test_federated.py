"""Tests of the federated round (metarec.meta.federated): FedMeta with one client is the centralised
meta-step, the client axis is a plain vmap, dropped clients and stragglers are masked exactly,
DP-FedAvg clipping bounds one client's influence, and the finite guard keeps the old state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from metarec import meta
from metarec.meta import federated as fed
from metarec.meta import step as mstep
from tests.unit.meta.test_meta import make_tasks, mlp_apply, mlp_init

MASK = {"l1": {"w": False, "b": False}, "l2": {"w": True, "b": True}}


def learner(name="metasgd"):
    return meta.make_learner(name, mlp_apply, inner_steps=1, inner_lr=0.1, adapt_mask=MASK)


def params0(lrn):
    return lrn.init(mlp_init(jax.random.PRNGKey(0)))


def client_tasks(seed, C, S, B):
    """``[C, S, B]`` tasks (all distinct) and all-ones weights."""
    t = make_tasks(seed, C * S * B)
    t = jax.tree_util.tree_map(lambda a: a.reshape((C, S, B) + a.shape[1:]), t)
    return t, jnp.ones((C, S, B))


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def close(a, b, **kw):
    np.testing.assert_allclose(flat(a), flat(b), **{"rtol": 1e-5, "atol": 1e-6} | kw)


@pytest.mark.parametrize("name", ["metasgd", "maml"])
def test_one_client_fedmeta_equals_centralised_meta_step(name):
    lrn = learner(name)
    opt = optax.adamw(1e-2, weight_decay=1e-4)
    steps, lr = fed.client_settings("fedmeta", 5, 0.3)
    assert (steps, lr) == (1, 1.0)
    rnd = fed.make_round(lrn, opt, local_lr=lr, clip_norm=0.5)
    central = mstep.make_meta_step(lrn, opt, clip_norm=0.5)
    p_f = p_c = params0(lrn)
    o_f = o_c = opt.init(p_f)
    for r in range(3):
        tasks, w = client_tasks(r, 1, 1, 6)
        w = w.at[0, 0, 5].set(0.0)  # a padding task in both
        p_f, o_f, m_f = rnd(p_f, o_f, tasks, w, jnp.ones(1), jnp.ones(1, jnp.int32))
        flat_tasks = jax.tree_util.tree_map(lambda a: a[0, 0], tasks)
        p_c, o_c, m_c = central(p_c, o_c, flat_tasks, w[0, 0])
        close(p_f, p_c)
        np.testing.assert_allclose(m_f["loss"], m_c["loss"], rtol=1e-6)
        np.testing.assert_allclose(m_f["grad_norm"], m_c["grad_norm"], rtol=1e-5)
        assert int(m_f["clients"]) == 1 and float(m_f["tasks"]) == 5.0


def test_one_client_fedmeta_with_keys_uses_the_meta_steps_keys():
    """With a PRNG key, one client with one local step gets the per-task keys of make_meta_step."""
    seen = {}

    def task_grad(p, task, key):
        seen.setdefault("keys", []).append(key)
        return jnp.sum(p * 0.0), jax.random.normal(key, p.shape)

    lrn = meta.MetaLearner(lambda p: p, None, task_grad, lambda p: p, "noise")
    opt = optax.sgd(1.0)
    p = jnp.zeros(3)
    tasks, w = client_tasks(0, 1, 1, 4)
    key = jax.random.PRNGKey(7)
    a = fed.make_round(lrn, opt, local_lr=1.0)(
        p, opt.init(p), tasks, w, jnp.ones(1), jnp.ones(1, jnp.int32), key
    )[0]
    flat_tasks = jax.tree_util.tree_map(lambda x: x[0, 0], tasks)
    b = mstep.make_meta_step(lrn, opt)(p, opt.init(p), flat_tasks, w[0, 0], key)[0]
    np.testing.assert_allclose(a, b, rtol=1e-6)


def manual_round(lrn, opt, params, tasks, w, part, steps, local_lr):
    """The round written as a Python loop over clients (no vmap over the client axis)."""
    client = jax.jit(fed.make_client_update(lrn, local_lr=local_lr))
    deltas, ns = [], []
    for c in range(w.shape[0]):
        if not part[c]:
            continue
        d, n, _ = client(params, jax.tree_util.tree_map(lambda a, c=c: a[c], tasks), w[c], steps[c])
        deltas.append(flat(d))
        ns.append(float(n))
    mean = sum(n * d for n, d in zip(ns, deltas)) / sum(ns)
    unravel = ravel_pytree(params)[1]
    g = unravel(jnp.asarray(-mean, jnp.float32))
    upd, _ = opt.update(g, opt.init(params), params)
    return optax.apply_updates(params, upd)


def test_vmap_over_clients_equals_a_loop():
    lrn = learner()
    opt = optax.adam(1e-2)
    p = params0(lrn)
    tasks, w = client_tasks(1, 4, 3, 2)
    w = w.at[1, 2, :].set(0.0).at[3, 0, 1].set(0.0)  # unequal client weights
    part = np.array([1, 1, 0, 1], np.float32)
    steps = np.array([3, 2, 3, 1], np.int32)
    got = fed.make_round(lrn, opt, local_lr=0.05)(
        p, opt.init(p), tasks, w, jnp.asarray(part), jnp.asarray(steps)
    )[0]
    want = manual_round(lrn, opt, p, tasks, w, part, steps, 0.05)
    close(got, want, rtol=2e-5)


def test_client_update_is_local_sgd():
    """Per-FedAvg's client: S local SGD steps on the learner's task-weighted meta-gradient."""
    lrn = learner()
    p = params0(lrn)
    tasks, w = client_tasks(2, 1, 3, 2)
    t, w = jax.tree_util.tree_map(lambda a: a[0], tasks), w[0]
    delta, n, _ = jax.jit(fed.make_client_update(lrn, local_lr=0.2))(p, t, w, 3)
    f = mstep.weighted_task_grad(lrn)
    grads = jax.jit(jax.vmap(lambda q, tt, ww: f(q, tt, ww, None), in_axes=(None, 0, 0)))
    q = p
    for j in range(3):
        tj = jax.tree_util.tree_map(lambda a, j=j: a[j], t)
        _, g = grads(q, tj, w[j])
        q = jax.tree_util.tree_map(lambda a, b: a - 0.2 * jnp.sum(b, 0) / 2.0, q, g)
    close(jax.tree_util.tree_map(jnp.add, p, delta), q)
    assert float(n) == 6.0


@pytest.mark.slow  # over 6 s in the default suite (2026-12-07); CI runs `make test-slow` too
def test_dropped_clients_change_nothing():
    lrn = learner()
    opt = optax.adamw(1e-2)
    p = params0(lrn)
    rnd = fed.make_round(lrn, opt, local_lr=0.1)
    tasks, w = client_tasks(3, 3, 2, 2)
    # the dropped client's data is garbage (NaN): masked out exactly
    poisoned = jax.tree_util.tree_map(
        lambda a: a.at[2].set(jnp.nan) if jnp.issubdtype(a.dtype, jnp.floating) else a, tasks
    )
    steps = jnp.full(3, 2, jnp.int32)
    a, _, ma = rnd(p, opt.init(p), poisoned, w, jnp.array([1.0, 1.0, 0.0]), steps)
    two = jax.tree_util.tree_map(lambda x: x[:2], tasks)
    b, _, mb = rnd(p, opt.init(p), two, w[:2], jnp.ones(2), steps[:2])
    close(a, b, rtol=1e-6)
    assert bool(ma["finite"]) and int(ma["clients"]) == 2
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)


def test_straggler_equals_a_client_with_fewer_local_steps():
    lrn = learner()
    opt = optax.sgd(1.0)
    p = params0(lrn)
    tasks, w = client_tasks(4, 2, 3, 2)
    rnd = fed.make_round(lrn, opt, local_lr=0.1)
    a = rnd(p, opt.init(p), tasks, w, jnp.ones(2), jnp.array([3, 1], jnp.int32))[0]
    # the same clients where client 1 only ever had its first local step
    w_short = w.at[1, 1:].set(0.0)
    b = rnd(p, opt.init(p), tasks, w_short, jnp.ones(2), jnp.array([3, 3], jnp.int32))[0]
    close(a, b, rtol=1e-6)
    short = jax.tree_util.tree_map(lambda x: x[:, :1], tasks)
    client = jax.jit(fed.make_client_update(lrn, local_lr=0.1), static_argnums=3)
    one = client(p, jax.tree_util.tree_map(lambda x: x[1], short), w[1, :1], 1)
    strag = client(p, jax.tree_util.tree_map(lambda x: x[1], tasks), w[1], 1)
    close(one[0], strag[0], rtol=0, atol=0)
    assert float(one[1]) == float(strag[1]) == 2.0


def test_dp_clipping_bounds_one_clients_influence():
    """Removing one client moves the clipped sum by at most C; replacing its data arbitrarily by at
    most 2C (the two clipped deltas, each of norm <= C)."""
    lrn = learner()
    p = params0(lrn)
    client = jax.jit(jax.vmap(fed.make_client_update(lrn, local_lr=1.0), in_axes=(None, 0, 0, 0)))
    tasks, w = client_tasks(5, 4, 1, 3)
    steps = jnp.ones(4, jnp.int32)
    bound = 0.05
    d, _, _ = client(p, tasks, w, steps)
    assert np.all(np.asarray(jax.vmap(optax.tree.norm)(d)) > bound)  # clipping is active
    base = flat(fed.dp_sum(d, jnp.ones(4), bound))
    removed = flat(fed.dp_sum(d, jnp.array([1.0, 1.0, 0.0, 1.0]), bound))
    assert np.linalg.norm(base - removed) <= bound * (1 + 1e-5)
    crazy = jax.tree_util.tree_map(
        lambda a: a.at[2].multiply(-1000.0) if a.dtype == jnp.float32 else a, tasks
    )
    d2, _, _ = client(p, crazy, w, steps)
    changed = flat(fed.dp_sum(d2, jnp.ones(4), bound))
    assert np.linalg.norm(base - changed) <= 2 * bound * (1 + 1e-5)


def test_dp_without_noise_and_clipping_is_the_uniform_mean():
    """Clip bound above every update, no noise, all clients sampled and equal weights: DP-FedAvg's
    sum / expected clients is the plain (task-weighted) round."""
    lrn = learner()
    opt = optax.adam(1e-2)
    p = params0(lrn)
    tasks, w = client_tasks(6, 3, 2, 2)
    args = (p, opt.init(p), tasks, w, jnp.ones(3), jnp.full(3, 2, jnp.int32))
    plain = fed.make_round(lrn, opt, local_lr=0.1)(*args)[0]
    dp = fed.make_round(lrn, opt, local_lr=0.1, dp_clip=1e6, expected_clients=3.0)(
        *args, None, jax.random.PRNGKey(0)
    )[0]
    close(plain, dp, rtol=1e-5)


def test_dp_noise_has_the_stated_scale():
    """With zero client updates the pseudo-gradient is the noise / expected clients: its std is
    sigma * C / expected."""
    lrn = meta.MetaLearner(
        lambda p: p, None, lambda p, t: (jnp.float32(0.0), jnp.zeros_like(p)), lambda p: p, "zero"
    )
    opt = optax.sgd(1.0)
    p = jnp.zeros(20000)
    tasks, w = client_tasks(0, 2, 1, 1)
    rnd = fed.make_round(lrn, opt, local_lr=1.0, dp_clip=0.5, dp_noise=2.0, expected_clients=4.0)
    new = rnd(
        p, opt.init(p), tasks, w, jnp.ones(2), jnp.ones(2, jnp.int32), None, jax.random.key(1)
    )
    np.testing.assert_allclose(np.std(np.asarray(new[0])), 2.0 * 0.5 / 4.0, rtol=0.03)


def test_non_finite_client_keeps_the_old_state():
    lrn = learner()
    opt = optax.adam(1e-2)
    p = params0(lrn)
    tasks, w = client_tasks(7, 2, 1, 2)
    bad = jax.tree_util.tree_map(
        lambda a: a.at[1].set(jnp.inf) if jnp.issubdtype(a.dtype, jnp.floating) else a, tasks
    )
    o = opt.init(p)
    new_p, new_o, m = fed.make_round(lrn, opt, local_lr=0.1)(
        p, o, bad, w, jnp.ones(2), jnp.ones(2, jnp.int32)
    )
    assert not bool(m["finite"])
    close(new_p, p, rtol=0, atol=0)
    close(new_o, o, rtol=0, atol=0)


def test_settings_and_errors():
    assert fed.client_settings("perfedavg", 3, 0.1) == (3, 0.1)
    assert fed.message_bytes({"a": jnp.zeros((3, 2)), "b": jnp.zeros(4)}) == 40
    with pytest.raises(ValueError, match="allowed: fedmeta, perfedavg, reptile"):
        fed.client_settings("fedsgd", 1, 1.0)
    with pytest.raises(ValueError, match="expected_clients"):
        fed.make_round(learner(), optax.sgd(1.0), local_lr=1.0, dp_clip=1.0)
