"""The user-level DP meta-step: clipping bounds one user's influence, the noise has the stated
std, and without noise and clipping it is the non-private meta-step bit for bit."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from metarec import meta
from metarec.meta import private
from metarec.meta import step as train
from tests.unit.meta.test_meta import (
    MLP_MASK,
    linear_apply,
    make_tasks,
    mlp_init,
    noisy_apply,
)

SGD1 = optax.sgd(1.0)
ADAM = optax.adam(1e-2)


def _learner():
    # stochastic (input dropout with the per-task keys): equality needs the same task keys
    return meta.metasgd(noisy_apply, inner_steps=2, inner_lr=0.1, adapt_mask=MLP_MASK)


LEARNER = _learner()


@functools.cache
def dp_step(opt="adam", **kw):
    return private.make_dp_meta_step(LEARNER, {"adam": ADAM, "sgd1": SGD1}[opt], **kw)


def _flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def _sum_of_clipped(mp, tasks, weights, clip):
    """The pre-noise clipped sum: with sgd(1), expected batch size 1 and no noise, the step
    returns ``mp - sum``."""
    new, _, m = dp_step("sgd1", l2_clip=clip, noise_multiplier=0.0, expected_batch_size=1.0)(
        mp, SGD1.init(mp), tasks, weights, jax.random.key(3)
    )
    return _flat(mp) - _flat(new), m


def test_no_noise_no_clip_reproduces_make_meta_step_exactly(xla_optimized):
    # exact on the programs users run (other fusions may round differently): one child process
    # for both chunkings
    for chunk in (None, 2):
        mp = LEARNER.init(mlp_init(jax.random.key(5)))
        tasks = make_tasks(4, 4)
        w = jnp.asarray([1.0, 0.0, 1.0, 1.0])
        ref = train.make_meta_step(LEARNER, ADAM, chunk_size=chunk)
        dp = dp_step(l2_clip=math.inf, noise_multiplier=0.0, chunk_size=chunk)
        p1, s1, key = mp, ADAM.init(mp), jax.random.key(0)
        p2, s2 = p1, s1
        for _ in range(3):
            key, sub = jax.random.split(key)
            p1, s1, m1 = ref(p1, s1, tasks, w, sub)
            p2, s2, m2 = dp(p2, s2, tasks, w, sub)
        np.testing.assert_array_equal(_flat(p1), _flat(p2))
        np.testing.assert_array_equal(_flat(s1), _flat(s2))
        for k in ("loss", "grad_norm", "weight", "finite"):
            assert np.asarray(m1[k]) == np.asarray(m2[k])
        assert float(m2["clipped"]) == 0.0


def _extreme(tasks, t):
    """``tasks`` with task ``t`` replaced by an extreme user (huge inputs and ratings)."""
    tasks = jax.tree_util.tree_map(np.array, tasks)
    for ex in (tasks.support, tasks.query):
        ex.x[t] = 50.0 * np.sign(ex.x[t] + 0.1)
        ex.y[t] = -1e4
    return tasks


@pytest.mark.parametrize("clip", [0.05, 1.0])
def test_clipping_bounds_every_users_contribution(clip):
    mp = LEARNER.init(mlp_init(jax.random.key(5)))
    tasks = make_tasks(4, 5)
    w = jnp.ones(5)
    base, _ = _sum_of_clipped(mp, tasks, w, clip)
    for t in range(5):
        changed, m = _sum_of_clipped(mp, _extreme(tasks, t), w, clip)
        assert float(m["clipped"]) > 0
        # add/remove adjacency (what the accountant assumes): adding or removing one user, the
        # extreme one included, moves the sum by at most the bound ...
        removed, _ = _sum_of_clipped(mp, tasks, w.at[t].set(0.0), clip)
        assert np.linalg.norm(removed - base) <= clip * (1 + 1e-5)
        assert np.linalg.norm(changed - removed) <= clip * (1 + 1e-5)
        # ... so replacing a user's data arbitrarily moves it by at most twice the bound
        assert np.linalg.norm(changed - base) <= 2 * clip * (1 + 1e-5)
    # an unclipped user's gradient is unchanged by clipping: a huge bound gives the plain sum
    plain, _ = _sum_of_clipped(mp, tasks, w, 1e9)
    mean = _flat(jax.tree_util.tree_map(jnp.subtract, mp, _sgd_mean(mp, tasks, w)))
    np.testing.assert_allclose(plain / 5, mean, rtol=1e-4, atol=1e-6)


def _sgd_mean(mp, tasks, w):
    step = train.make_meta_step(LEARNER, SGD1)
    return step(mp, SGD1.init(mp), tasks, w, jax.random.key(3))[0]


def test_non_finite_user_is_dropped_with_clipping_and_skips_the_step_without():
    mp = LEARNER.init(mlp_init(jax.random.key(9)))
    tasks = jax.tree_util.tree_map(np.array, make_tasks(8, 4))
    tasks.query.y[1, 0] = np.nan
    w = jnp.ones(4)
    # clipped: the user contributes zeros, the others their clipped gradients
    bad, m = _sum_of_clipped(mp, tasks, w, 1.0)
    assert bool(m["finite"]) and float(m["dropped"]) == 1.0
    without, _ = _sum_of_clipped(mp, tasks, w.at[1].set(0.0), 1.0)
    np.testing.assert_allclose(bad, without, rtol=1e-6, atol=1e-7)
    # no clipping (the non-private step): the guard keeps the old parameters
    new, _, m = dp_step(l2_clip=math.inf, noise_multiplier=0.0)(
        mp, ADAM.init(mp), tasks, w, jax.random.key(0)
    )
    assert not bool(m["finite"])
    np.testing.assert_array_equal(_flat(new), _flat(mp))


def _zero_grad_setup(d=20000):
    """A linear model whose every task has weight 0: the clipped sum is exactly zero, so the
    step's update is the noise alone."""

    def apply(params, x, *, key=None, train=False):
        return linear_apply(params, x)

    learner = meta.maml(apply, inner_steps=1, inner_lr=0.1)
    mp = learner.init(jnp.zeros(d))
    tasks = make_tasks(0, 2, d=d, ns=2, nq=2)
    return learner, mp, tasks, jnp.zeros(2)


@pytest.mark.parametrize("sigma,clip,batch", [(2.0, 0.5, 1.0), (1.3, 2.0, 8.0)])
def test_noise_has_the_stated_std(sigma, clip, batch):
    learner, mp, tasks, w = _zero_grad_setup()
    step = private.make_dp_meta_step(
        learner, SGD1, l2_clip=clip, noise_multiplier=sigma, expected_batch_size=batch
    )
    new, _, m = step(mp, SGD1.init(mp), tasks, w, jax.random.key(1))
    noise = -np.asarray(new)  # mp = 0, sgd(1): new = -(sum + noise) / batch
    std = sigma * clip / batch
    assert abs(noise.mean()) < 4 * std / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(std, rel=0.03)
    assert float(m["weight"]) == 0.0
    # same key, same noise; another key, other noise
    again = np.asarray(step(mp, SGD1.init(mp), tasks, w, jax.random.key(1))[0])
    other = np.asarray(step(mp, SGD1.init(mp), tasks, w, jax.random.key(2))[0])
    np.testing.assert_array_equal(again, -noise)
    assert abs(np.corrcoef(noise, other)[0, 1]) < 0.05


def test_noise_key_leaves_the_task_keys_alone():
    """The noisy step's update is the noiseless step's plus noise from the folded-in key: the
    per-task keys (dropout) are unchanged by turning the noise on."""
    mp = LEARNER.init(mlp_init(jax.random.key(5)))
    tasks, w, key = make_tasks(4, 4), jnp.ones(4), jax.random.key(11)
    kw = dict(l2_clip=1.0, expected_batch_size=4.0)
    clean = _flat(dp_step("sgd1", noise_multiplier=0.0, **kw)(mp, SGD1.init(mp), tasks, w, key)[0])
    noisy = _flat(dp_step("sgd1", noise_multiplier=0.7, **kw)(mp, SGD1.init(mp), tasks, w, key)[0])
    noise = private.gaussian_noise(jax.random.fold_in(key, private.NOISE_STREAM), mp, 0.7 * 1.0)
    np.testing.assert_allclose(clean - noisy, _flat(noise) / 4.0, rtol=1e-5, atol=1e-6)


def test_jit_equals_nojit():
    mp = LEARNER.init(mlp_init(jax.random.key(6)))
    tasks, w = make_tasks(5, 4), jnp.asarray([1.0, 1.0, 0.0, 1.0])
    kw = dict(l2_clip=0.3, noise_multiplier=1.1, expected_batch_size=3.0, chunk_size=2)
    a = private.make_dp_meta_step(LEARNER, ADAM, jit=False, **kw)
    b = dp_step(**kw)
    ra = a(mp, ADAM.init(mp), tasks, w, jax.random.key(4))
    rb = b(mp, ADAM.init(mp), tasks, w, jax.random.key(4))
    np.testing.assert_allclose(_flat(ra[:2]), _flat(rb[:2]), rtol=1e-5, atol=1e-6)
    assert float(ra[2]["clipped"]) == pytest.approx(float(rb[2]["clipped"]))


def test_bad_arguments_give_one_clear_error():
    mp = LEARNER.init(mlp_init(jax.random.key(6)))
    tasks = make_tasks(5, 4)
    step = dp_step(l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=2.0)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        step(mp, ADAM.init(mp), tasks, jnp.ones(4), None)
    for kw, match in [
        (dict(l2_clip=0.0, noise_multiplier=1.0), "l2_clip must be > 0"),
        (dict(l2_clip=1.0, noise_multiplier=-1.0), "noise_multiplier must be >= 0"),
        (dict(l2_clip=math.inf, noise_multiplier=1.0), "needs a finite l2_clip"),
        (dict(l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=0), "expected_batch_size"),
        (dict(l2_clip=1.0, noise_multiplier=1.0, chunk_size=0), "chunk_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            private.make_dp_meta_step(LEARNER, ADAM, **kw)
    with pytest.raises(ValueError, match="must divide"):
        dp_step(l2_clip=1.0, noise_multiplier=0.0, chunk_size=3)(
            mp, ADAM.init(mp), tasks, jnp.ones(4), jax.random.key(0)
        )
