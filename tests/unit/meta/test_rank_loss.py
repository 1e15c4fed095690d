"""The outer ranking term: ListNet's loss against hand-computed values and its closed-form
gradient, and learners whose query loss differs from the inner loss (meta-gradients checked
against finite differences and against the linearity of the meta-gradient in the outer loss)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from metarec import meta
from metarec.meta.inner import listnet, mse, with_rank_term
from tests.unit.meta.test_meta import _central_fd, index, make_tasks, mlp_apply, mlp_init


def _softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def test_listnet_hand_computed_shift_invariant_and_padding_ignored():
    preds = jnp.asarray([1.0, 2.0, 0.5, 99.0])
    y = jnp.asarray([3.0, 5.0, 4.0, 1.0])
    mask = jnp.asarray([1.0, 1.0, 1.0, 0.0])
    q = _softmax(np.array([3.0, 5.0, 4.0]))
    logp = np.log(_softmax(np.array([1.0, 2.0, 0.5])))
    assert float(listnet(preds, y, mask)) == pytest.approx(-(q * logp).sum(), rel=1e-6)
    # the padded entry's prediction and target do not matter
    other = listnet(preds.at[3].set(-7.0), y.at[3].set(5.0), mask)
    assert float(other) == pytest.approx(float(listnet(preds, y, mask)), rel=1e-6)
    # a ranking loss: the same after a common shift; minimal (= the targets' entropy) at y / tau
    assert float(listnet(preds + 3.0, y, mask)) == pytest.approx(float(listnet(preds, y, mask)))
    q2 = _softmax(np.array([3.0, 5.0, 4.0]) / 2.0)
    at_min = listnet(y / 2.0 + 1.0, y, mask, temperature=2.0)
    assert float(at_min) == pytest.approx(-(q2 * np.log(q2)).sum(), rel=1e-5)
    # fewer than two real examples: no ordering to learn
    assert float(listnet(preds, y, jnp.asarray([0.0, 1.0, 0.0, 0.0]))) == 0.0
    assert float(listnet(preds, y, jnp.zeros(4))) == 0.0


def test_listnet_gradient_is_softmax_minus_target_distribution():
    preds = jnp.asarray([0.3, -1.0, 2.0, 0.0])
    y = jnp.asarray([4.0, 2.0, 5.0, 3.0])
    mask = jnp.asarray([1.0, 1.0, 1.0, 0.0])
    g = np.asarray(jax.grad(listnet)(preds, y, mask))
    expected = _softmax(np.asarray(preds[:3])) - _softmax(np.asarray(y[:3]))
    np.testing.assert_allclose(g[:3], expected, rtol=1e-5, atol=1e-7)
    assert g[3] == 0.0
    # no NaN gradient on an all-padding set
    assert np.all(np.isfinite(np.asarray(jax.grad(listnet)(preds, y, jnp.zeros(4)))))


@pytest.mark.parametrize("algo", ["maml", "fomaml", "metasgd"])
def test_query_loss_fn_none_equals_the_inner_loss_bit_for_bit(algo):
    params = mlp_init(jax.random.key(0))
    task = index(make_tasks(0, 1), 0)
    make = getattr(meta, algo)
    a = make(mlp_apply, inner_steps=2, inner_lr=0.1)
    b = make(mlp_apply, inner_steps=2, inner_lr=0.1, query_loss_fn=mse)
    la, ga = a.task_grad(a.init(params), task)
    lb, gb = b.task_grad(b.init(params), task)
    assert float(la) == float(lb)
    for x, z in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(z))


@pytest.mark.parametrize("algo", ["maml", "metasgd"])
def test_rank_term_meta_gradient_matches_finite_differences_and_is_linear(algo):
    with jax.enable_x64(True):
        params = mlp_init(jax.random.key(1), dtype=jnp.float64)
        task = index(make_tasks(0, 1, dtype=np.float64), 0)
        make = getattr(meta, algo)
        w = 0.7
        ranked = make(mlp_apply, inner_steps=2, inner_lr=0.2, query_loss_fn=with_rank_term(mse, w))
        plain = make(mlp_apply, inner_steps=2, inner_lr=0.2)
        rank_only = make(mlp_apply, inner_steps=2, inner_lr=0.2, query_loss_fn=listnet)
        mp = ranked.init(params)
        task_grad = jax.jit(ranked.task_grad)
        loss, g = task_grad(mp, task)
        fd = _central_fd(lambda p: float(task_grad(p, task)[0]), mp)
        np.testing.assert_allclose(np.asarray(ravel_pytree(g)[0]), fd, rtol=1e-6, atol=1e-8)
        # the outer loss is a sum, so is its meta-gradient; the inner loop is the same
        lp, gp = plain.task_grad(mp, task)
        lr, gr = rank_only.task_grad(mp, task)
        assert float(loss) == pytest.approx(float(lp) + w * float(lr), rel=1e-12)
        np.testing.assert_allclose(
            np.asarray(ravel_pytree(g)[0]),
            np.asarray(ravel_pytree(gp)[0]) + w * np.asarray(ravel_pytree(gr)[0]),
            rtol=1e-10,
            atol=1e-12,
        )
        assert np.linalg.norm(np.asarray(ravel_pytree(gr)[0])) > 1e-3
        # the adapted parameters do not depend on the outer loss
        np.testing.assert_array_equal(
            np.asarray(ravel_pytree(ranked.adapt(mp, task.support))[0]),
            np.asarray(ravel_pytree(plain.adapt(mp, task.support))[0]),
        )


def test_rank_term_refusals():
    with pytest.raises(ValueError, match="weight >= 0"):
        with_rank_term(mse, -1.0)
    with pytest.raises(ValueError, match="temperature > 0"):
        with_rank_term(mse, 1.0, temperature=0.0)
    with pytest.raises(ValueError, match="no option"):
        meta.make_learner("imaml", mlp_apply, query_loss_fn=listnet)


def test_config_outer_rank_weight_refusals():
    from experiments.coldstart.build import build_learner, validate_config
    from experiments.coldstart.configs import default

    cfg = default.get_config()
    cfg.outer_rank_weight = 0.5
    with pytest.raises(ValueError, match="--config.outer_rank_weight: imaml has no separate"):
        build_learner("imaml", mlp_apply, cfg)
    cfg.outer_rank_weight = -0.1
    with pytest.raises(ValueError, match="--config.outer_rank_weight must be >= 0"):
        validate_config(cfg)
